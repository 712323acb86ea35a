"""One process runs the model: selection math, the token plan, checkpoints, the HF and vLLM backends. No Ray."""
