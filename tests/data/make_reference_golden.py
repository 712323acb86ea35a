"""Make tests/data/reference_golden.json by running the published HiRED code itself.

The golden file pins ``--mode reference`` to the published implementation
(github.com/hasanar1f/HiRED, its transformers 4.42 fork, ``modeling_llava_next.py``):
for each image and budget it records which visual tokens that code sends to the
language model, in which order (flat ``p * 576 + j`` indices, partition 0 the full
image) and the greedy token ids it generates. ``tests/test_hf.py`` rebuilds the
same tiny checkpoint with ``hired_batch.engine.tiny`` and compares our engine to it. The
tests never run this script; it needs two Python environments:

1. ``prepare`` (the project's venv, transformers 5): builds the tiny checkpoint the
   fork's hard-coded constants need (16 CLIP heads, 24 CLIP layers so its layers 0
   and 22 apply; tiny widths otherwise), writes a copy in the 4.42 weight layout
   (CLIP under ``vision_tower.vision_model.``), the test images and our prompt ids.
2. ``run-published`` (a venv with the fork installed, see below): loads that copy
   with the fork, runs its ``generate`` (its HiRED selection and packing) on the
   pixel values of ``golden_pixels``, reads what it sent, checks that against the
   prefill embeddings, and writes the JSON. Seeded pixels rather than an image
   processor's output: transformers' image processors resize a few sizes one pixel
   row apart from version to version (4.42, 5.19 and 5.24 all differ on 684x1216,
   1216x684, 300x270), which is preprocessing, not HiRED, and would tie the golden
   file to one transformers release.

Environment used for the committed file (2026-12-02)::

    python3 -m venv /work/venvs/hired-ref
    /work/venvs/hired-ref/bin/pip install torch==2.13.0 "numpy<2" "pillow>=10.0.1,<=15.0"
    git --git-dir=<HiRED clone>/.git archive HEAD transformers | tar -x -C /work/venvs/hired-ref/src
    /work/venvs/hired-ref/bin/pip install /work/venvs/hired-ref/src/transformers   # 4.42.0.dev0
    PYTHONPATH=. .venv/bin/python tests/data/make_reference_golden.py prepare /tmp/golden
    /work/venvs/hired-ref/bin/python tests/data/make_reference_golden.py run-published /tmp/golden \\
        tests/data/reference_golden.json
    /work/venvs/hired-ref/bin/python tests/data/make_reference_golden.py sweep tests/data/reference_golden.json

``sweep`` adds the fork's ``unpad_image`` on a sweep of sizes (``sweep_sizes``): the
sizes where its float32 truncation differs from float64 rounding.

HiRED commit: 502d6dd (hasanar1f/HiRED, "refactors readme").
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

# --------------------------------------------------------------------------- the cases (one owner: the JSON)

CHECKPOINT_SEED = 7
# The fork hard-codes CLS attention of CLIP layers 0 and 22 with 16 heads.
WIDTHS = {"vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 24, "num_attention_heads": 16}}
# (height, width, image seed): every anyres grid, and sizes the float32 unpadding cuts.
IMAGES = [
    (336, 672, 1),  # 1x2
    (672, 336, 2),  # 2x1
    (500, 900, 3),  # 2x2
    (336, 1008, 4),  # 1x3
    (1008, 336, 5),  # 3x1
    (684, 1216, 6),  # 2x2, float32 truncation cuts one more row per side
    (1216, 684, 7),  # 2x2, the same on columns
    (300, 270, 8),  # 1x2 for a nearly square image: the transposed canvas holds more
]
BUDGETS = [0.1, 0.2, 0.5, 1.0]
ALPHA = 0.5
QUESTION = "What is in the picture?"
MAX_NEW_TOKENS = 8
N_TOKENS = 576
# Sizes on which the fork's unpad_image is compared with float64 rounding (``sweep_sizes``).
SWEEP = {"generic": [100, 2400, 59], "critical": [100, 2400, 7]}  # range() arguments
CANVASES = [(24, 48), (48, 24), (48, 48), (24, 72), (72, 24)]  # token canvases (height, width)


def sweep_sizes() -> list[tuple[int, int, int, int]]:
    """(height, width, canvas height, canvas width) of the unpadding sweep, sorted.

    A coarse grid of image sizes on every canvas, the sizes where the exact new side
    (h * cw / w, or w * ch / h) is a whole number (only there can float32 truncation
    land one below float64 rounding), and the test images.
    """
    sizes = set()
    generic, critical = range(*SWEEP["generic"]), range(*SWEEP["critical"])
    for ch, cw in CANVASES:
        sizes.update((h, w, ch, cw) for h in generic for w in generic)
        for side in critical:
            sizes.update((n * side // cw, side, ch, cw) for n in range(1, ch) if n * side % cw == 0)
            sizes.update((side, n * side // ch, ch, cw) for n in range(1, cw) if n * side % ch == 0)
        sizes.update((h, w, ch, cw) for h, w, _ in IMAGES)
    return sorted(sizes)


def weights_digest(state: dict) -> str:
    """sha256 over (name, float32 bytes) in name order: which tiny checkpoint this is."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def golden_pixels(shape, seed: int):
    """Pixel values (P, 3, H, W) float32 for one golden image: seeded, in CLIP's
    normalized range, the same under every transformers and numpy release."""
    import numpy as np

    return np.random.default_rng(seed).uniform(-1.8, 2.1, size=tuple(shape)).astype(np.float32)


# --------------------------------------------------------------------------- 1) prepare (transformers 5)


def prepare(work: pathlib.Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from hired_batch.engine.inputs import make_synthetic_image
    from hired_batch.engine.tiny import build_tiny_checkpoint
    from hired_batch.engine.weights import Preprocessor

    ours = build_tiny_checkpoint(work / "ours", "llava_next", seed=CHECKPOINT_SEED, widths=WIDTHS)
    state = load_file(str(ours / "model.safetensors"))
    # transformers 5 saves CLIP as vision_tower.{embeddings,encoder,...}; 4.42 nests it
    # under vision_tower.vision_model. Everything else already has the 4.x names.
    legacy = {
        ("vision_tower.vision_model." + k[len("vision_tower.") :] if k.startswith("vision_tower.") else k): v
        for k, v in state.items()
    }
    pub = work / "published"
    pub.mkdir(parents=True, exist_ok=True)
    save_file(legacy, str(pub / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((ours / "config.json").read_text())
    config["torch_dtype"] = "float32"
    config["text_config"]["rope_theta"] = config["text_config"]["rope_parameters"]["rope_theta"]
    (pub / "config.json").write_text(json.dumps(config, indent=2))
    (pub / "generation_config.json").write_text((ours / "generation_config.json").read_text())
    image_proc = json.loads((ours / "processor_config.json").read_text())["image_processor"]

    pre = Preprocessor.from_pretrained(str(ours))
    items = []
    for k, (h, w, seed) in enumerate(IMAGES):
        image = make_synthetic_image(w, h, seed)
        image.save(work / f"image{k}.png")  # lossless: the fork sees the same pixels
        prepared = pre(image, QUESTION)  # the prompt ids and the crop count P
        np.save(work / f"ours_pixels{k}.npy", golden_pixels(prepared.pixel_values.shape, seed))
        items.append({"height": h, "width": w, "seed": seed, "input_ids": prepared.input_ids.tolist()})
    meta = {
        "items": items,
        "image_processor": image_proc,
        "image_token_id": pre.image_token_id,
        "weights_sha256": weights_digest({k: torch.as_tensor(v) for k, v in state.items()}),
    }
    (work / "prepared.json").write_text(json.dumps(meta))
    print(f"prepared {work}")


# --------------------------------------------------------------------------- 2) run the fork (transformers 4.42)


def _published_model(work: pathlib.Path):
    import torch
    import transformers
    from transformers import LlavaNextForConditionalGeneration

    model_cls = LlavaNextForConditionalGeneration
    if not hasattr(model_cls, "HiRED_token_selection"):
        raise SystemExit(
            f"transformers {transformers.__version__} at {transformers.__file__} "
            "is not the HiRED fork (no HiRED_token_selection)"
        )
    model = model_cls.from_pretrained(str(work / "published"), torch_dtype=torch.float32).eval()
    return model


def _capture(model):
    """Hooks keeping the projector output and the language model's prefill embeddings."""
    seen = {}

    def projector(module, args, out):
        seen.setdefault("projected", out.detach().clone())  # (P, 576, D): every token

    def language(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and "embeds" not in seen:
            seen["embeds"] = kwargs["inputs_embeds"].detach().clone()  # the prefill

    handles = [
        model.multi_modal_projector.register_forward_hook(projector),
        model.language_model.register_forward_pre_hook(language, with_kwargs=True),
    ]
    return seen, handles


def _sent_order(model, masks, image_sizes) -> list[int]:
    """The fork's own packing applied to features that carry their own flat index."""
    import torch

    P = masks.shape[0]
    index_feats = torch.arange(P * N_TOKENS, dtype=torch.float64).view(P, N_TOKENS, 1)
    packed, lens = model.pack_HiRED_image_features(
        [index_feats], image_sizes, image_newline=None, image_features_masks=(masks,)
    )
    return packed[:, 0].long().tolist()


def _run_one(model, item, pixels, budget, image_token_id):
    """One image at one budget through the fork's generate; (order sent, greedy ids)."""
    import torch

    model.config.hired_config = {"token_budget_rate": budget, "alpha": ALPHA}
    ids = torch.tensor([item["input_ids"]])
    image_sizes = torch.tensor([[item["height"], item["width"]]])  # int64 (height, width), as its processor gives
    seen, handles = _capture(model)
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.from_numpy(pixels)[None],
                image_sizes=image_sizes,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
            )
    finally:
        for h in handles:
            h.remove()
    order = _sent_order(model, model.selected_tokens_mask[0], image_sizes)
    # Check the order against what really reached the language model: the prefill
    # embeddings at the image's place are the projected features at these indices.
    pos = item["input_ids"].index(image_token_id)
    sent = seen["embeds"][0, pos : pos + len(order)]
    want = seen["projected"].reshape(-1, sent.shape[-1])[torch.tensor(order)]
    if not torch.equal(sent, want):
        raise SystemExit(f"{item['height']}x{item['width']} at {budget}: packed order does not match the embeddings")
    if seen["embeds"].shape[1] != len(item["input_ids"]) - 1 + len(order):
        raise SystemExit("prefill length is not text + visual tokens")
    return order, out[0, ids.shape[1] :].tolist()


def _check_processor_size(image_processor, image, item, pixels):
    """The fork's own processor sees the same image size and crop count as ours."""
    inputs = image_processor(image, return_tensors="np")
    if inputs["image_sizes"][0].tolist() != [item["height"], item["width"]]:
        raise SystemExit(f"the fork's processor reports size {inputs['image_sizes'][0]} for {item}")
    if inputs["pixel_values"][0].shape != pixels.shape:
        raise SystemExit(f"the fork's processor makes crops {inputs['pixel_values'][0].shape}, ours {pixels.shape}")


def _sweep():
    """Sizes where the fork's unpad_image (float32, int()) differs from float64 rounding."""
    import torch
    from transformers.models.llava_next import modeling_llava_next as fork

    differ = []
    for h, w, ch, cw in sweep_sizes():
        # unpad_image cuts the same number of rows (or columns) from both sides, so
        # the shape it returns gives the box, even when nothing is left.
        kept_h, kept_w = fork.unpad_image(torch.zeros(ch, cw), torch.tensor([h, w])).shape  # int64 size
        top, left = (ch - kept_h) // 2, (cw - kept_w) // 2
        box = [top, ch - top, left, cw - left]
        if box != _float64_box(h, w, ch, cw):
            differ.append([h, w, ch, cw] + box)
    return {"rule": SWEEP, "canvases": CANVASES, "checked": len(sweep_sizes()), "differs_from_float64": differ}


def _float64_box(h, w, ch, cw):
    """Stock transformers' unpadding (float64, rounded to 7 places), for the sweep only."""
    if w / h > cw / ch:
        new = int(round(h * (cw / w), 7))
        pad = (ch - new) // 2
        return [pad, ch - pad, 0, cw]
    new = int(round(w * (ch / h), 7))
    pad = (cw - new) // 2
    return [0, ch, pad, cw - pad]


def run_published(work: pathlib.Path, out_path: pathlib.Path) -> None:
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import LlavaNextImageProcessor

    meta = json.loads((work / "prepared.json").read_text())
    model = _published_model(work)
    image_processor = LlavaNextImageProcessor(
        **{k: v for k, v in meta["image_processor"].items() if k != "image_processor_type"}
    )
    state = load_file(str(work / "published" / "model.safetensors"))
    ours_names = {
        (
            "vision_tower." + k[len("vision_tower.vision_model.") :]
            if k.startswith("vision_tower.vision_model.")
            else k
        ): v
        for k, v in state.items()
    }
    if weights_digest(ours_names) != meta["weights_sha256"]:
        raise SystemExit("the converted weights are not the prepared checkpoint's")
    cases = []
    for k, item in enumerate(meta["items"]):
        # The fork gets the seeded golden pixels (see golden_pixels): image preprocessing
        # is transformers' (releases resize a few sizes one pixel row apart), not HiRED's.
        pixels = np.load(work / f"ours_pixels{k}.npy")
        image = Image.open(work / f"image{k}.png").convert("RGB")
        _check_processor_size(image_processor, image, item, pixels)
        for budget in BUDGETS:
            order, ids = _run_one(model, item, pixels, budget, meta["image_token_id"])
            cases.append(
                {
                    "height": item["height"],
                    "width": item["width"],
                    "seed": item["seed"],
                    "budget": budget,
                    "n_sent": len(order),
                    "order": order,
                    "greedy_ids": ids,
                }
            )
            print(f"{item['height']}x{item['width']} budget {budget}: sent {len(order)}, ids {ids}", flush=True)
    golden = {
        "about": "What the published HiRED code (hasanar1f/HiRED 502d6dd, transformers 4.42 fork) sends "
        "to the language model on the tiny checkpoint below; made by tests/data/make_reference_golden.py",
        "published_transformers": transformers.__version__,
        "torch": torch.__version__,
        "checkpoint": {"seed": CHECKPOINT_SEED, "widths": WIDTHS, "weights_sha256": meta["weights_sha256"]},
        "alpha": ALPHA,
        "question": QUESTION,
        "max_new_tokens": MAX_NEW_TOKENS,
        "pixels": "golden_pixels(shape, seed) of make_reference_golden.py fed to the fork and to ours",
        "cases": cases,
    }
    out_path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes)")


def add_sweep(out_path: pathlib.Path) -> None:
    """(Re)write the golden file's ``unpad_sweep`` entry with the fork's unpad_image."""
    golden = json.loads(out_path.read_text())
    golden["unpad_sweep"] = _sweep()
    out_path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(
        f"unpad sweep: {golden['unpad_sweep']['checked']} sizes, "
        f"{len(golden['unpad_sweep']['differs_from_float64'])} differ from float64 rounding"
    )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "prepare":
        prepare(pathlib.Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "run-published":
        run_published(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "sweep":
        add_sweep(pathlib.Path(sys.argv[2]))
    else:
        raise SystemExit(
            "usage: make_reference_golden.py prepare WORKDIR | run-published WORKDIR OUT.json | sweep OUT.json"
        )
