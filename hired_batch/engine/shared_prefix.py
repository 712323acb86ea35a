"""The HF engine's prefill for questions that share an image (``--ask``): the prompt prefix
(system prompt and image tokens) once per image, then all the questions of an image in
one batched pass over their own tokens.

A batch's rows are laid out for ``generate`` as usual (left padding, every row's last
prompt token in the last column, the KV cache of everything before it), except that a row
may hold padding between its prefix and its question: an image's questions differ in
length, and one pass runs them side by side, each right-aligned against its prefix
(``[pad | prefix | pad | question]``). The attention mask has zeros wherever a row has
padding, and positions follow the mask (``generate`` counts them the same way), so each
question sees exactly its prefix and itself. Running each question alone instead costs a
full pass over the weights per question, like a decode step; batched, an image's k
questions cost one.

No Ray here; transformers' documented cache API only (``DynamicCache.update``,
``layers[i].keys/values``).
"""

from __future__ import annotations

import torch


def prefill_shared(lm, kw: str, text_config, embeds, attn, input_ids, shared, image_token_id: int, pad_id: int):
    """The batch's KV cache of every prompt token but the last, and the batch re-laid as the
    cache holds it: ``(cache, embeds, attn, input_ids)``.

    ``lm``: the language model (called with ``kw`` as its cache keyword); ``embeds`` (B, L, D),
    ``attn`` and ``input_ids`` (B, L): the left-padded batch; ``shared``: per row its image's
    ``SharedImage``, whose ``prefix`` KV is computed here by the first row that needs it.
    The returned ``embeds`` hold only each row's last token (the one ``generate`` runs);
    ``input_ids`` has ``pad_id`` wherever ``attn`` is 0."""

    B, L, D = embeds.shape
    rows = []  # per row: (its tokens but the last (T, D), their ids (T,), prefix length c)
    for b, n in enumerate(attn.sum(dim=1).tolist()):
        ids = input_ids[b, L - n : L - 1]
        c = int((ids == image_token_id).nonzero()[-1, 0]) + 1
        rows.append((embeds[b, L - n : L - 1], ids, c))
        _ensure_prefix(lm, kw, text_config, shared[b], embeds[b : b + 1, L - n : L - n + c], ids[:c])
    groups: dict = {}  # image -> its rows, in batch order
    for b, image in enumerate(shared):
        groups.setdefault(id(image), []).append(b)
    kv: list = [None] * B  # per row, per layer (keys, values) (kv_heads, c + S, head_dim)
    spans = [None] * B  # per row: (prefix length, suffix block width S, its own suffix length)
    for members in groups.values():
        image = shared[members[0]]
        layers, width = _suffix_pass(lm, kw, text_config, image, [rows[b] for b in members], D)
        for j, b in enumerate(members):
            kv[b] = [(k[j], v[j]) for k, v in layers]
            c = rows[b][2]
            spans[b] = (c, width, len(rows[b][1]) - c)
    W = max(c + s for c, s, _ in spans)  # the cache's length; the last token comes after it
    cache_kv = [
        tuple(t.new_zeros(B, t.shape[0], W, t.shape[2]) for t in layer) for layer in kv[0]
    ]  # per layer K and V (B, kv_heads, W, head_dim); zeros = padding
    new_attn = torch.zeros((B, W + 1), dtype=attn.dtype)
    new_ids = torch.full((B, W + 1), pad_id, dtype=input_ids.dtype)
    for b, (c, width, own) in enumerate(spans):
        start = W - (c + width)  # the row's block [prefix | pad | question] ends at W
        for (k, v), (rk, rv) in zip(cache_kv, kv[b]):
            k[b, :, start:W] = rk
            v[b, :, start:W] = rv
        ids = rows[b][1]
        new_attn[b, start : start + c] = 1
        new_attn[b, W - own : W] = 1
        new_ids[b, start : start + c] = ids[:c]
        new_ids[b, W - own : W] = ids[c:]
    new_attn[:, W] = 1
    new_ids[:, W] = input_ids[:, L - 1]
    cache = cache_of(cache_kv, text_config)
    last = embeds.new_zeros(B, W + 1, D)
    last[:, W] = embeds[:, L - 1]
    return cache, last, new_attn.to(attn.device), new_ids


def cache_of(layers: list, text_config):
    """A ``DynamicCache`` holding ``layers`` (per layer (keys, values), emptied as it goes:
    each layer's source can go right after its copy)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=text_config)
    for i in range(len(layers)):
        cache.update(*layers.pop(0), i)
    return cache


def _ensure_prefix(lm, kw, text_config, image, prefix_embeds, prefix_ids) -> None:
    """Prefill ``image``'s prompt prefix once: ``prefix_embeds`` (1, c, D), ``prefix_ids`` (c,)."""
    from transformers import DynamicCache

    key = tuple(prefix_ids.tolist())
    if image.prefix_ids == key:
        return
    first = DynamicCache(config=text_config)
    lm(inputs_embeds=prefix_embeds, use_cache=True, **{kw: first})
    image.prefix_ids, image.prefix = key, [(layer.keys, layer.values) for layer in first.layers]


def _suffix_pass(lm, kw, text_config, image, rows, D: int):
    """One pass over the questions of one image, continuing its prefix cache.

    ``rows``: per question (tokens but the last (T, D), their ids, prefix length c), every
    c equal (one image, one prefix). Returns per layer (keys, values) of shape
    (questions, kv_heads, c + S, head_dim) and S, the widest question: each question sits
    right-aligned in the last S positions, padding (masked) before it."""
    from transformers import DynamicCache

    n, c = len(rows), rows[0][2]
    own = [len(ids) - c for _, ids, _ in rows]
    S = max(own)
    cache = DynamicCache(config=text_config)
    for i, (k, v) in enumerate(image.prefix):  # (1, kv_heads, c, head_dim) -> one per question
        cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i)
    if S == 0:
        return [(layer.keys, layer.values) for layer in cache.layers], 0
    x = rows[0][0].new_zeros(n, S, D)  # (n, S, D): each question right-aligned
    mask = torch.ones((n, c + S), dtype=torch.long)
    pos = torch.full((n, S), c, dtype=torch.long)
    for j, ((emb, _, _), s) in enumerate(zip(rows, own)):
        x[j, S - s :] = emb[c:]
        mask[j, c : c + S - s] = 0
        pos[j, S - s :] = torch.arange(c, c + s)
    lm(inputs_embeds=x, attention_mask=mask.to(x.device), position_ids=pos.to(x.device), use_cache=True, **{kw: cache})
    return [(layer.keys, layer.values) for layer in cache.layers], S
