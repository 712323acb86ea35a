"""VisionZip (Yang et al., CVPR 2025): per crop, a few dominant tokens by CLS attention,
the rest merged into a few contextual tokens.

Per partition (the full image, then each anyres sub-image), at the feature layer (-2):

1. dominant: the CLS token plus the D-1 patches with the most CLS attention (summed
   over heads), in index order;
2. contextual: the remaining patches, in index order, are compared by their keys
   (mean over heads, L2-normalised); C of them at a uniform stride (every
   ``R // C``-th of the R remaining) are targets, every other one joins the target it
   is most similar to, and a contextual token is the target's state plus the mean of
   the states that joined it (the target itself when none did).

D + C = T, the partition's share of the budget; C is ``CONTEXTUAL_SHARE`` of T (the
paper's 54:10 of 64, which its 108:20 and 162:30 keep). The CLS state and the
contextual tokens are new vectors (``Tokens.new``, ``NEW`` in ``kept_indices``): a CLS
token is not a patch, so no p*N+j index names it.

Order sent, as the published code (github.com/dvlab-research/VisionZip,
``visionzip/llava_arch.py``) sends it: the full image's CLS, dominant and contextual
tokens; then the sub-images' dominant patches on their canvas in raster order (no
unpadding, no image-newline tokens); then the sub-images' CLS tokens; then their
contextual tokens, sub-image by sub-image. LLaVA-1.5: CLS, dominant, contextual.

Modes (``selection.mode``): ``reference`` gives every partition the same T, as the
published code does (a fraction of one crop's N tokens; ``--budget-tokens`` B gives
B // P); ``exact`` meets the budget to the token (round(budget * P * N), or B) and
shares it evenly over the partitions, the full image first for the remainder.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from hired_batch.config import ConfigError
from hired_batch.engine.anyres import Layout, sub_image_canvas
from hired_batch.engine.selectors import NEW, Needs, Selector, Tokens, TowerOut, register
from hired_batch.engine.selectors.budget import resolve_budget

CONTEXTUAL_SHARE = 10 / 64  # contextual tokens per partition token: the paper's 54 dominant : 10 contextual
MIN_PER_PARTITION = 2  # the CLS and one patch kept by attention: less leaves a crop no dominant patch


# --------------------------------------------------------------------------- budget -> D, C


def split(tokens: int, share: float | None = None) -> tuple[int, int]:
    """(D, C) of a partition sending ``tokens``: D dominant (the CLS included), C contextual;
    ``share``: C's share of ``tokens`` (``--visionzip-contextual``; None: ``CONTEXTUAL_SHARE``),
    leaving at least ``MIN_PER_PARTITION`` dominant."""
    share = CONTEXTUAL_SHARE if share is None else float(share)
    contextual = min(int(math.floor(tokens * share + 0.5)), max(0, tokens - MIN_PER_PARTITION))
    return tokens - contextual, contextual


def partition_tokens(budget, mode: str, n_parts: int, n_tokens: int) -> list[int]:
    """Tokens each partition sends (the full image first); ConfigError when one would get
    fewer than ``MIN_PER_PARTITION``."""
    if mode == "reference":
        if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
            each = min(int(budget), n_parts * n_tokens) // n_parts
        else:
            each = resolve_budget(budget, n_tokens)
        shares = [each] * n_parts
    else:
        total = resolve_budget(budget, n_parts * n_tokens)
        shares = [total // n_parts + (1 if p < total % n_parts else 0) for p in range(n_parts)]
    if min(shares) < MIN_PER_PARTITION:
        raise ConfigError(
            f"visionzip needs at least {MIN_PER_PARTITION} tokens per crop (the CLS and one dominant patch), "
            f"but budget {budget!r} ({mode} mode) gives {min(shares)} to one of {n_parts} crops; "
            f"give a budget of at least {MIN_PER_PARTITION * n_parts} tokens"
        )
    return shares


# --------------------------------------------------------------------------- one partition


@dataclass
class Zipped:
    """One partition after VisionZip."""

    dominant: torch.Tensor  # (D-1,) int64 patch indices kept by attention, ascending (the CLS aside)
    targets: torch.Tensor  # (C,) int64 patch indices the contextual tokens are centred on
    groups: torch.Tensor  # (N,) int64: the contextual token each patch went into, -1 for dominant ones
    contextual: torch.Tensor  # (C, Dv) the merged tokens


def zip_partition(scores, keys, states, tokens: int, share: float | None = None) -> Zipped:
    """VisionZip on one partition sending ``tokens`` (see the module docstring).

    ``scores`` (N,) CLS attention summed over heads; ``keys`` (N, Dh) patch keys, mean over
    heads; ``states`` (N, Dv) feature-layer states. Keys and states stay on their device,
    in their dtype (the merge is computed there, as the published code does). ``share``:
    ``split``'s.
    """
    n_dominant, n_contextual = split(tokens, share)
    N = scores.shape[0]
    keep = torch.zeros(N, dtype=torch.bool)
    keep[scores.cpu().topk(n_dominant - 1).indices] = True
    dominant, rest = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    groups = torch.full((N,), -1, dtype=torch.long)
    if n_contextual == 0:
        return Zipped(dominant, rest[:0], groups, states[:0])
    dev = keys.device
    k = keys[rest.to(dev)]
    k = k / k.norm(dim=-1, keepdim=True)
    # targets: every step-th remaining patch; the others join their most similar target
    step = max(1, len(rest) // n_contextual)
    is_target = torch.zeros(len(rest), dtype=torch.bool)
    is_target[torch.arange(0, len(rest), step)[:n_contextual]] = True
    t_pos, o_pos = is_target.nonzero().flatten(), (~is_target).nonzero().flatten()
    assign = (k[o_pos.to(dev)] @ k[t_pos.to(dev)].T).argmax(dim=1)  # (R - C,) target number
    h = states[rest.to(dev)]
    onehot = torch.zeros(len(o_pos), n_contextual, dtype=h.dtype, device=h.device)
    onehot[torch.arange(len(o_pos), device=h.device), assign] = 1
    mean = onehot.T @ h[o_pos.to(dev)] / onehot.sum(dim=0).clamp(min=1)[:, None]
    groups[rest[t_pos]] = torch.arange(n_contextual)
    groups[rest[o_pos]] = assign.cpu()
    return Zipped(dominant, rest[t_pos], groups, h[t_pos.to(dev)] + mean)


def zip_image(selection, layout: Layout, seen: TowerOut) -> list[Zipped]:
    """``zip_partition`` on every partition of one image."""
    shares = partition_tokens(selection.budget_arg, selection.mode, layout.n_parts, layout.n_tokens)
    rows, keys = seen.cls_rows["final"], seen.keys["final"]
    c = selection.visionzip_contextual
    return [zip_partition(rows[p], keys[p], seen.features[p], t, c) for p, t in enumerate(shares)]


# --------------------------------------------------------------------------- the selector


@register
class VisionZip(Selector):
    """VisionZip's dominant and contextual tokens (``zip_partition``) on every partition."""

    name = "visionzip"
    needs = Needs(cls_rows=("final",), keys=("final",), cls_state=True)

    def check_budget(self, selection, n_tokens: int, max_parts: int) -> None:
        # the image with the most crops gets the smallest shares
        partition_tokens(selection.budget_arg, selection.mode, max_parts, n_tokens)

    def count(self, selection, layout: Layout) -> int:
        return sum(partition_tokens(selection.budget_arg, selection.mode, layout.n_parts, layout.n_tokens))

    def select(self, selection, layout: Layout, seen: TowerOut) -> Tokens:
        zipped = zip_image(selection, layout, seen)
        N, P = layout.n_tokens, layout.n_parts
        mask = torch.zeros(P, N, dtype=torch.bool)
        for p, z in enumerate(zipped):
            mask[p, z.dominant] = True
        cls = seen.cls_states
        first = zipped[0]
        # the full image (or the one crop): its CLS, its dominant patches, its contextual tokens
        indices = [torch.tensor([NEW]), first.dominant, torch.full((len(first.contextual),), NEW)]
        new = [cls[:1], first.contextual]
        if P > 1:  # sub-images: dominant patches on the whole canvas, then CLS tokens, then contextual
            canvas = sub_image_canvas(layout.grid, N).reshape(-1)
            indices += [canvas[mask.flatten()[canvas]], torch.full((P - 1,), NEW)]
            new.append(cls[1:])
            for z in zipped[1:]:
                indices.append(torch.full((len(z.contextual),), NEW))
                new.append(z.contextual)
        return Tokens(torch.cat(indices).long(), mask, torch.cat([v.to(cls.dtype) for v in new]))
