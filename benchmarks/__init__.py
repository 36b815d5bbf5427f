"""Benchmarks of flare_agent_async: ``python -m benchmarks``."""
