"""hired_batch: HiRED-pruned LLaVA batch inference on Ray Data.

Layers, imported one way only (tests/test_layers.py): entry (cli) -> tooling (bench,
score, visualize) -> job (sources, stages, pipeline, runner) -> engine (model, vllm/)
-> base (config, hired, token_plan); the README's Layout section lists every module.
"""

__version__ = "0.1.0"
