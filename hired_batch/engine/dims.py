"""What a LLaVA model is made of, without weights: its sizes (``ModelDims``, from the
config), the bytes its weights and one KV position take, and one item's token counts
(``ItemTokens``).

Production reads these (the memory model that sizes automatic batches, the generation
stage); the FLOP model of ``hired_batch.bench.ideal`` reads them too. Pure arithmetic: no
torch, no transformers classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.config import ConfigError

# LLaVA's vision_feature_layer: the features come from the penultimate CLIP layer's output.
LLAVA_FEATURE_LAYER = -2
# LLaVA-NeXT's anyres resolutions, (height, width) in pixels: the grids an image may get.
ANYRES_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


# Bytes one weight (or activation) takes in each precision the job runs: the one table
# every size estimate reads (a torch dtype is named by its str without "torch.").
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def bytes_per_param(dtype) -> int:
    """Bytes per parameter of ``dtype``: a name ("bfloat16") or a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ConfigError(f"no byte size known for dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


# --------------------------------------------------------------------------- dimensions


@dataclass(frozen=True)
class ModelDims:
    """The sizes the cost model needs, from a LLaVA config (no weights)."""

    v_hidden: int  # CLIP width, channels per token
    v_intermediate: int  # CLIP MLP inner width
    v_heads: int  # CLIP attention heads
    v_layers_run: int  # CLIP encoder layers run: up to the feature layer (23 of 24 for LLaVA)
    t_hidden: int  # language-model width
    t_intermediate: int  # language-model (SwiGLU) MLP inner width
    t_layers: int  # language-model decoder layers
    t_heads: int  # language-model query heads
    t_kv_heads: int  # language-model key/value heads (= t_heads without GQA)
    vocab: int  # LM head rows
    v_feature_layers: int = 1  # CLIP layers concatenated into the projector input
    image_size: int = 336  # crop side, pixels
    patch_size: int = 14  # CLIP patch side, pixels
    bytes_per_param: int = 4  # 4 for float32, 2 for float16 / bfloat16
    is_next: bool = True  # LLaVA-NeXT (anyres + newline tokens) or LLaVA-1.5 (one crop)

    @property
    def n_patches(self) -> int:
        """N: patch tokens per crop (576 for 336 px / patch 14)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def v_tokens(self) -> int:
        """Tokens the CLIP encoder attends over per crop: N patches + CLS."""
        return self.n_patches + 1

    @property
    def kv_dim(self) -> int:
        """Width of one K (or V) row per layer."""
        return self.t_hidden // self.t_heads * self.t_kv_heads

    @classmethod
    def from_hf(cls, config, bytes_per_param: int = 4) -> "ModelDims":
        """From a transformers LlavaConfig / LlavaNextConfig (or its ``to_dict()``)."""
        get = _getter(config)
        v, t = _getter(get("vision_config")), _getter(get("text_config"))
        layers = feature_layer_ids(get("vision_feature_layer"), v("num_hidden_layers"))
        heads = t("num_attention_heads")
        return cls(
            v_hidden=v("hidden_size"),
            v_intermediate=v("intermediate_size"),
            v_heads=v("num_attention_heads"),
            v_layers_run=max(layers),
            t_hidden=t("hidden_size"),
            t_intermediate=t("intermediate_size"),
            t_layers=t("num_hidden_layers"),
            t_heads=heads,
            t_kv_heads=t("num_key_value_heads") or heads,
            vocab=t("vocab_size"),
            v_feature_layers=len(layers),
            image_size=v("image_size"),
            patch_size=v("patch_size"),
            bytes_per_param=bytes_per_param,
            is_next=get("model_type") == "llava_next",
        )


def feature_layer_ids(vision_feature_layer, n_layers: int) -> list[int]:
    """hidden_states indices of a config's ``vision_feature_layer`` (an int or a list) in a
    CLIP tower of ``n_layers`` (0 = embeddings, i = output of encoder layer i-1); the
    largest is how many encoder layers a run needs. ConfigError outside 1..n_layers."""
    ids = vision_feature_layer if isinstance(vision_feature_layer, (list, tuple)) else [vision_feature_layer]
    out = [int(i) + n_layers + 1 if i < 0 else int(i) for i in ids]
    if any(not (1 <= i <= n_layers) for i in out):
        raise ConfigError(f"vision_feature_layer {vision_feature_layer!r} must name encoder layers 1..{n_layers}")
    return out


def _getter(obj):
    if isinstance(obj, dict):
        return lambda k: obj.get(k)
    return lambda k: getattr(obj, k, None)


# --------------------------------------------------------------------------- parameters


def vision_params(d: ModelDims) -> int:
    """CLIP weights the run touches (layers up to the feature layer + patch embedding)."""
    per_layer = 4 * d.v_hidden**2 + 2 * d.v_hidden * d.v_intermediate
    return d.v_layers_run * per_layer + 3 * d.patch_size**2 * d.v_hidden


def projector_params(d: ModelDims) -> int:
    """Linear(v_hidden * feature_layers -> t_hidden), GELU, Linear(t_hidden -> t_hidden)."""
    return d.v_hidden * d.v_feature_layers * d.t_hidden + d.t_hidden**2


def lm_layer_params(d: ModelDims) -> int:
    """One decoder layer: q and o (t x t), k and v (t x kv), SwiGLU gate/up/down."""
    return 2 * d.t_hidden**2 + 2 * d.t_hidden * d.kv_dim + 3 * d.t_hidden * d.t_intermediate


def lm_params(d: ModelDims) -> int:
    """Decoder layers + LM head (the embedding table is only looked up)."""
    return d.t_layers * lm_layer_params(d) + d.t_hidden * d.vocab


def weight_bytes(d: ModelDims) -> int:
    """All weights resident on the device: tower, projector, LM, embedding table."""
    embed = d.t_hidden * d.vocab
    return (vision_params(d) + projector_params(d) + lm_params(d) + embed) * d.bytes_per_param


def kv_bytes_per_token(d: ModelDims) -> int:
    """K and V of one position in every layer."""
    return 2 * d.t_layers * d.kv_dim * d.bytes_per_param


@dataclass(frozen=True)
class ItemTokens:
    """One item as the model sees it."""

    n_crops: int  # P: crops through the vision tower (1 + rows*cols, or 1)
    n_visual: int  # visual tokens sent to the LM (newlines included)
    n_text: int  # text tokens of the prompt (the <image> placeholder excluded)
    n_projected: int | None = None  # tokens through the projector (None = n_visual)

    @property
    def n_prompt(self) -> int:
        return self.n_visual + self.n_text
