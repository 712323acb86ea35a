"""Helpers shared by several test modules (Ray nodes started with `ray start`, S3 faults)."""
