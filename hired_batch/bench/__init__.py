"""Benchmarks: the engine, the Ray Data job and the ideal FLOP/byte model."""

# The model sizes ``--preset`` names (``model_sizes.PRESETS``' keys), here so that building
# the CLI's parsers imports no transformers (``hired-batch doctor`` must run without it).
PRESET_NAMES = ("tiny", "scaled", "llava-next-7b")
