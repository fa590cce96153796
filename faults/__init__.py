"""The fault matrix: scenarios of crashes, restarts, rebalances and broker faults on a real local broker, each
checked by an independent read_committed verifier against ``stream-app replay`` of the same input."""
