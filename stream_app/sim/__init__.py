"""A ground-truth simulator of the product's users, and the evaluation that runs the pipeline against it.

In-process parts (population, simulator, closed loop, evaluation) import the pure core and replay, never
Faust or aiokafka; ``stream_app.sim.kafka`` imports aiokafka only when it produces.
"""
