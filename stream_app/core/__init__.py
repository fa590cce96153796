"""The functional core: pure domain logic. Imports only the standard library, numpy and river.

The import contract in pyproject.toml (import-linter) fails the build if anything here imports
faust, mode, aiokafka or prometheus_client.
"""
