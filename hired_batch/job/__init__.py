"""The Ray Data job: task presets, sources, stages, the pipeline and the `run` command."""
