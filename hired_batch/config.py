"""Frozen configuration dataclasses, one per concern, every field with a default.

Validation lives in ``check()`` methods that raise ConfigError naming what was expected
and what came, so bad configuration fails before any work starts. This module imports
nothing heavy (no torch, no Ray) so the CLI can validate flags instantly.
"""

from __future__ import annotations

from dataclasses import dataclass

SELECTORS = ("hired", "full", "spatial", "random")
MODES = ("exact", "reference")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SUPPORTED_MODEL_TYPES = ("llava_next", "llava")  # transformers model_type values the engine runs


class ConfigError(ValueError):
    """A user mistake (a flag, an option, an input path, a model that is not LLaVA): the
    CLI prints it as one line and exits 2. Any other exception is a bug and keeps its
    traceback. A ValueError subclass, so callers that catch ValueError still catch it."""


def check_vision_chunk(vision_chunk) -> int:
    """Crops per vision-tower call, as an int >= 1; ConfigError otherwise."""
    if int(vision_chunk) < 1:
        raise ConfigError(f"vision_chunk must be >= 1 crop, got {vision_chunk!r}")
    return int(vision_chunk)


@dataclass(frozen=True)
class SelectionConfig:
    """Which visual tokens reach the language model."""

    selector: str = "hired"  # hired | full (stock LLaVA) | spatial | random
    mode: str = "exact"  # exact (budget met to the token) | reference (published masks)
    budget: float = 0.2  # fraction of the P*576 CLIP patch tokens kept, in (0, 1]
    budget_tokens: int | None = None  # if set: visual tokens kept per image, overrides budget
    alpha: float = 0.5  # share of the budget given to the full image, in [0, 1]
    seed: int = 0  # seed of the `random` selector
    return_indices: bool = False  # report the kept token indices per item

    def check(self) -> "SelectionConfig":
        """Raise ConfigError on an out-of-range field; return self."""
        if self.selector not in SELECTORS:
            raise ConfigError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (0.0 < float(self.budget) <= 1.0):
            raise ConfigError(f"budget must be a fraction in (0, 1], got {self.budget!r}")
        if self.budget_tokens is not None and int(self.budget_tokens) < 1:
            raise ConfigError(f"budget_tokens must be >= 1, got {self.budget_tokens!r}")
        if not (0.0 <= float(self.alpha) <= 1.0):
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha!r}")
        return self

    @property
    def budget_arg(self):
        """The budget as hired.hired_mask takes it: an int count or a float fraction."""
        return int(self.budget_tokens) if self.budget_tokens is not None else float(self.budget)


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are decoded."""

    max_new_tokens: int = 64  # tokens generated per item at most
    min_new_tokens: int = 0  # EOS suppressed before this many (bench: = max_new_tokens)
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0  # nucleus sampling mass when sampling
    seed: int | None = None  # torch seed set before each batch when sampling

    def check(self) -> "GenerationConfig":
        """Raise ConfigError on an out-of-range field; return self."""
        if int(self.max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not (0 <= int(self.min_new_tokens) <= int(self.max_new_tokens)):
            raise ConfigError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens!r}")
        if float(self.temperature) < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        return self

    @property
    def do_sample(self) -> bool:
        return float(self.temperature) > 0


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint, on which device, in which precision."""

    path: str = "llava-hf/llava-v1.6-vicuna-7b-hf"  # hub id or local checkpoint directory
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    vision_chunk: int = 8  # image crops per vision-tower call: caps CLIP's activations at any batch size

    def check(self) -> "ModelConfig":
        """Raise ConfigError on an out-of-range field; return self."""
        check_vision_chunk(self.vision_chunk)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not self.path:
            raise ConfigError("model path must be a hub id or a local directory, got an empty string")
        return self
