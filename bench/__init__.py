"""Benchmark harness: throughput, latency, memory, recovery and scale on a real local Kafka broker.

``python -m bench --help``; see docs/benchmark.md.
"""
