"""Token selectors: how an image's CLIP patch tokens become the visual tokens it sends.

A selector is one module of this package holding one class registered by name
(``@register``). It declares

- ``needs``: what it reads from the vision tower besides the feature-layer states
  every selector gets (CLS attention rows of l_init / l_final, patch keys);
- ``count``: how many visual tokens an image sends, known before vision runs (the
  token plan asks it; vLLM's processor places that many placeholders);
- ``select``: the tokens sent, in order (``Tokens``): original patch tokens by index,
  LLaVA-NeXT's image-newline slots, or new vectors it made (merged tokens).

Both backends call the same two functions: ``select`` (a batch's tower outputs through
the selector, counts checked against the plan) and ``embed`` (gather and project).
``MaskSelector`` is the base of the methods that keep a subset (HiRED and the baselines):
they only write a keep-mask.

This package does not know transformers, vLLM or Ray and runs no model: selectors get
tensors and return tensors (``embed`` calls the projector it is handed).
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from hired_batch.config import ConfigError
from hired_batch.engine.anyres import NEWLINE, Layout, sent_indices
from hired_batch.engine.selectors.budget import resolve_budget

NEW = -2  # in a list of sent token indices: the next vector the selector made (``Tokens.new``)
LAYERS = ("init", "final")  # CLIP layers a selector may read, by role: l_init, l_final (``vision.selection_layers``)


# --------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class Needs:
    """What a selector reads from the vision tower, besides the feature-layer states."""

    cls_rows: tuple = ()  # CLS->patch attention (P, N), heads summed, of these LAYERS
    keys: tuple = ()  # patch keys (P, N, Dh), mean over heads, of these LAYERS (VisionZip's similarity)
    cls_state: bool = False  # the feature layer's CLS state (P, Dv), which the features drop (VisionZip sends it)

    def layer_ids(self, l_init: int, l_final: int) -> dict:
        """{role: encoder layer id} of the CLS rows to capture."""
        return _roles(self.cls_rows, l_init, l_final)

    def key_layer_ids(self, l_init: int, l_final: int) -> dict:
        """{role: encoder layer id} of the patch keys to capture (``vision.ClsAttentionHooks``)."""
        return _roles(self.keys, l_init, l_final)


def _roles(roles: tuple, l_init: int, l_final: int) -> dict:
    ids = {"init": l_init, "final": l_final}
    return {role: ids[role] for role in roles}


@dataclass
class TowerOut:
    """One image's share of the vision tower's outputs (what its selector's ``needs`` asked for)."""

    features: torch.Tensor | None = None  # (P, N, Dv) feature-layer states, CLS dropped; None when planning masks only
    cls_rows: dict = field(default_factory=dict)  # role -> (P, N) CLS attention, on the CPU
    keys: dict = field(default_factory=dict)  # role -> (P, N, Dh), mean over heads, where the tower ran
    cls_states: torch.Tensor | None = None  # (P, Dv) the feature layer's CLS states, where the tower ran


@dataclass
class Tokens:
    """The visual tokens one image sends, in the order sent, before projection."""

    indices: torch.Tensor  # (K,) int64: p*N+j an original patch token, NEWLINE the image-newline, NEW a made vector
    mask: torch.Tensor  # (P, N) bool: the original tokens kept as themselves (before the packing's unpadding)
    new: torch.Tensor | None = None  # (M, Dv) made vectors (e.g. merged tokens), one per NEW slot, in order


class Selector:
    """A token-selection method. Subclass, set ``name`` and ``needs``, write ``count`` and
    ``select``, decorate the class with ``@register``."""

    name: str = ""
    needs: Needs = Needs()
    # Sends what stock LLaVA sends (every content token, newlines, stock order): the vLLM plugin
    # then runs vLLM's own code, and ``embed`` projects in stock order (bit-identical to stock).
    stock: bool = False

    def count(self, selection, layout: Layout) -> int:
        """Visual tokens the image sends, known before vision (exact unless ``exact`` says not)."""
        raise NotImplementedError

    def exact(self, selection) -> bool:
        """Whether ``count`` is exact (True) or an upper bound the tokens sent may fall below."""
        return True

    def pack_mode(self, selection) -> str:
        """Which geometry orders the kept originals (``anyres.packed_order``'s mode)."""
        return "exact"

    def check_budget(self, selection, n_tokens: int, max_parts: int) -> None:
        """ConfigError, before any work, when the budget cannot run on an image of
        ``max_parts`` crops of ``n_tokens`` (the checkpoint's largest); any budget can by default."""

    def select(self, selection, layout: Layout, seen: TowerOut) -> Tokens:
        """The tokens this image sends."""
        raise NotImplementedError


class MaskSelector(Selector):
    """A selector that keeps a subset of the original tokens: it writes only ``mask``; the
    kept tokens are sent in ``pack_mode``'s packing order, the count is the budget capped
    at what that packing can send."""

    def mask(self, selection, layout: Layout, seen: TowerOut) -> torch.Tensor:
        """Bool (P, N) keep-mask of one image."""
        raise NotImplementedError

    def count(self, selection, layout: Layout) -> int:
        budget = resolve_budget(selection.budget_arg, layout.n_parts * layout.n_tokens)
        return min(budget, layout.sendable(self.pack_mode(selection)))

    def select(self, selection, layout: Layout, seen: TowerOut) -> Tokens:
        mask = self.mask(selection, layout, seen)
        order = sent_indices(mask, layout.image_size, layout.grid, layout.n_tokens, self.pack_mode(selection))
        return Tokens(order, mask)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict = {}
_loaded = False


def register(cls):
    """Class decorator: make a ``Selector`` subclass available as ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and type(taken) is not cls:
        raise ValueError(f"selector {cls.name!r} is already {type(taken).__module__}.{type(taken).__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget a selector registered at run time (tests)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    """Import every module of this package once: each method registers itself there."""
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> tuple:
    """Names of the registered selectors (every module of this package, and any registered since)."""
    _load_builtins()
    return tuple(_REGISTRY)


def get(name: str) -> Selector:
    """The selector registered as ``name``; ConfigError naming the known ones otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"selector must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- the one path


def select(selections, layouts, features=None, cls_rows=None, keys=None, cls_states=None) -> list:
    """Every image of a batch through its selector: a ``Tokens`` per image.

    ``selections``/``layouts``: one per image; ``features`` (sum P, N, Dv) the batch's
    feature-layer states (CLS dropped), images one after the other; ``cls_rows``
    {role: (sum P, N)} the CLS rows the selector's ``needs`` named, ``keys``
    {role: (sum P, N, Dh)} its patch keys and ``cls_states`` (sum P, Dv) the feature
    layer's CLS states, if it named them. Each image's token count is checked against its
    planned ``count``.
    """
    rows = {role: r.cpu() for role, r in (cls_rows or {}).items()}  # CPU<->GPU sync: selection is tiny and branchy
    out, start = [], 0
    for selection, layout in zip(selections, layouts):
        sel, P = get(selection.selector), layout.n_parts
        seen = TowerOut(
            features[start : start + P] if features is not None else None,
            {role: r[start : start + P] for role, r in rows.items()},
            {role: k[start : start + P] for role, k in (keys or {}).items()},
            cls_states[start : start + P] if cls_states is not None else None,
        )
        tokens = sel.select(selection, layout, seen)
        _check_count(sel, selection, layout, tokens)
        out.append(tokens)
        start += P
    return out


def _check_count(sel: Selector, selection, layout: Layout, tokens: Tokens) -> None:
    planned, sent = sel.count(selection, layout), len(tokens.indices)
    if sent > planned or (sel.exact(selection) and sent != planned):
        raise RuntimeError(f"selector {sel.name!r} sent {sent} tokens for an image planned at {planned}")


def embed(tokens, features, n_parts, projector, newline=None, stock: bool = False) -> list:
    """Per image (K_i, D): its sent tokens projected into the language model's space.

    ``features`` (sum P, N, Dv) as given to ``select``; ``n_parts`` P per image;
    ``projector`` the model's per-token projector; ``newline`` (D,) the learned vector
    NEWLINE slots get; ``stock``: project every token, then pick (stock LLaVA's order of
    operations, which keeps the full selector bit-identical to stock transformers).
    """
    N, Dv = features.shape[1], features.shape[2]
    offsets = [o * N for o in itertools.accumulate(n_parts, initial=0)]  # first token of each image
    idx = torch.cat([torch.where(t.indices >= 0, t.indices + int(o), t.indices) for t, o in zip(tokens, offsets)])
    flat = features.reshape(-1, Dv)  # (sum P * N, Dv)
    if stock:
        projected = projector(features)  # (sum P, N, D)
        out = projected.reshape(-1, projected.shape[-1])[idx.clamp(min=0).to(projected.device)]
    else:  # only the sent rows (the projector is per token)
        src = flat[idx.clamp(min=0).to(flat.device)]
        made = [t.new for t in tokens if t.new is not None]
        if made:
            src[(idx == NEW).to(src.device)] = torch.cat(made).to(src.dtype)
        out = projector(src)
    if bool((idx == NEWLINE).any()):
        if newline is None:
            raise RuntimeError("a selector sent image-newline slots but the model has no image_newline")
        out[(idx == NEWLINE).to(out.device)] = newline.to(out.dtype)
    return list(out.split([len(t.indices) for t in tokens]))


def select_mask(
    selector: str,
    init_attn,
    final_attn,
    *,
    budget,
    valid,
    alpha: float = 0.5,
    grid=None,
    mode: str = "exact",
    regions=None,
    seed: int = 0,
) -> torch.Tensor:
    """A mask selector's bool (P, N) keep-mask from bare tensors (tests, notebooks):
    ``valid``/``regions`` as ``Layout`` takes them, ``budget`` a fraction or a count.
    ``full``/``spatial``/``random`` read no attention (pass None)."""
    sel = get(selector)
    if not isinstance(sel, MaskSelector):
        raise ValueError(f"selector {selector!r} keeps no subset, so it has no keep-mask")
    selection = SimpleNamespace(selector=selector, budget_arg=budget, alpha=alpha, mode=mode, seed=seed)
    layout = Layout(None, grid, valid.shape[1], valid=valid, regions=regions)
    return sel.mask(selection, layout, TowerOut(cls_rows={"init": init_attn, "final": final_attn}))
