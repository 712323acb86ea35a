"""Benchmarks: the engine, the Ray Data job and the ideal FLOP/byte model."""
