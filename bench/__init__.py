"""Benchmarks of the mesh: load generator, scenarios, reports (`python -m bench`)."""
