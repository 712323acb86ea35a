"""Make tests/data/visionzip_golden.json by running the published VisionZip code itself.

The golden file pins ``--selector visionzip --mode reference`` to the published
implementation (github.com/dvlab-research/VisionZip, ``visionzip/``: its CLIP patches and
its LLaVA ``prepare_inputs_labels_for_multimodal`` / ``restore_image_features_sorted``,
applied by its own ``visionzip(model, dominant, contextual)`` on LLaVA's original code,
github.com/haotian-liu/LLaVA, which it patches). For each image and budget it records
what that code sends to the language model: the visual rows of the prefill embeddings,
identified against the projected CLIP states of every patch and CLS token (an original
patch as ``p * 576 + j``, a CLS state or a merged contextual token as -2, our
``kept_indices`` convention; a row equal to a patch the code did not keep as dominant, by
its own returned indices, is a contextual token no other patch joined: -2), the norm of every row (which pins the CLS and merged
vectors and their order), and the greedy token ids. ``tests/test_visionzip.py``
rebuilds the checkpoint and compares our engine with it. The tests never run this
script; it needs two Python environments:

1. ``prepare`` (the project's venv): ``make_reference_golden.py prepare`` (the same tiny
   16-head, 24-layer checkpoint, images, seeded pixels and prompt ids as HiRED's golden
   file: VisionZip's code hard-codes CLIP layer 22 = the layer before the last of 24),
   plus each budget's (dominant, contextual) from ``selectors.visionzip.split``.
2. ``run-published`` (a venv with transformers 4.37.2, the release LLaVA pins, and the
   two repositories' sources on PYTHONPATH, unmodified): converts the checkpoint to
   LLaVA's layout (a CLIP directory for its vision tower, the projector as
   ``mm_projector``), calls ``visionzip(model, dominant=D, contextual=C)`` and LLaVA's
   ``generate`` on the seeded pixels with ``image_sizes`` (width, height) as LLaVA's
   loaders give them, and writes the JSON.

Environment used for the committed file (2026-12-06)::

    python3 -m venv /tmp/h/vzenv
    /tmp/h/vzenv/bin/pip install transformers==4.37.2 tokenizers==0.15.2 "huggingface_hub<0.25" "numpy<2" \\
        safetensors pillow sentencepiece protobuf
    echo <project venv>/lib/python3.11/site-packages > /tmp/h/vzenv/lib/python3.11/site-packages/zz_main.pth  # torch 2.13
    git --git-dir=<LLaVA clone> archive HEAD llava | tar -x -C /tmp/h/src          # c121f04
    git --git-dir=<VisionZip clone> archive HEAD visionzip | tar -x -C /tmp/h/src  # 3151f6d
    PYTHONPATH=. .venv/bin/python tests/data/make_visionzip_golden.py prepare /tmp/h/golden
    PYTHONPATH=/tmp/h/src /tmp/h/vzenv/bin/python tests/data/make_visionzip_golden.py run-published \\
        /tmp/h/golden tests/data/visionzip_golden.json
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
BUDGETS = [0.1, 0.2, 0.5]
# HiRED's golden images: the first five are one per anyres grid (1x2, 2x1, 2x2, 1x3, 3x1);
# the others pin HiRED's float32 unpadding, which VisionZip does not do.
N_IMAGES = 5
N_TOKENS = 576
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for an image in input_ids
NEW = -2  # a made vector (CLS state or merged token), as in our kept_indices


def hired_golden_script():
    """make_reference_golden.py as a module: the shared checkpoint, images and pixels."""
    spec = importlib.util.spec_from_file_location("make_reference_golden", HERE / "make_reference_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- 1) prepare (project venv)


def prepare(work: pathlib.Path) -> None:
    from hired_batch.engine.selectors.budget import resolve_budget
    from hired_batch.engine.selectors.visionzip import split

    hired_golden_script().prepare(work)
    meta = json.loads((work / "prepared.json").read_text())
    meta["visionzip"] = {str(b): list(split(resolve_budget(b, N_TOKENS))) for b in BUDGETS}
    (work / "prepared.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- 2) run the published code


def _llava_model(work: pathlib.Path, state: dict, config: dict):
    """LLaVA's own LlavaLlamaForCausalLM holding the prepared checkpoint's weights."""
    import torch
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    clip_dir = work / "llava-clip"
    vcfg = CLIPVisionConfig(**{k: v for k, v in config["vision_config"].items() if k != "model_type"})
    clip = CLIPVisionModel(vcfg)
    vision = {"vision_model." + k[len("vision_tower.") :]: v for k, v in state.items() if k.startswith("vision_tower.")}
    clip.load_state_dict(vision, strict=True)
    clip.save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(
        str(clip_dir)
    )
    t = config["text_config"]
    cfg = LlavaConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        rms_norm_eps=t["rms_norm_eps"],
        rope_theta=t["rope_parameters"]["rope_theta"],
        max_position_embeddings=t["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=t["bos_token_id"],
        eos_token_id=t["eos_token_id"],
        pad_token_id=t["pad_token_id"],
        mm_vision_tower=str(clip_dir),
        mm_hidden_size=vcfg.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=config["vision_feature_layer"],
        mm_vision_select_feature="patch",
        image_aspect_ratio="anyres",
        image_grid_pinpoints=[[w, h] for h, w in config["image_grid_pinpoints"]],  # LLaVA: (width, height)
        mm_patch_merge_type="spatial_unpad",
        mm_use_im_start_end=False,
        tokenizer_padding_side="right",
    )
    model = LlavaLlamaForCausalLM(cfg)
    rename = {
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
        "multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "image_newline": "model.image_newline",
    }
    llm = {}
    for k, v in state.items():
        for old, new in rename.items():
            if k.startswith(old):
                llm[new + k[len(old) :]] = v
    missing, unexpected = model.load_state_dict(llm, strict=False)
    if missing or unexpected:
        raise SystemExit(f"LLaVA layout: missing {missing}, unexpected {unexpected}")
    model.get_vision_tower().load_model()
    return model.to(torch.float32).eval()


def _capture(model):
    """The language model's prefill embeddings (what the published code sends) and the
    CLIP hidden states its vision pass computed (observed by hooks, nothing changed)."""
    seen = {}

    def language(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and "embeds" not in seen:
            seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    def clip(module, args, out):
        seen.setdefault("hidden", out.hidden_states[-2].detach().clone())  # (P, 577, Dv): the feature layer

    def projector(module, args, out):
        # (P, D + C, Dv): its dominant states (CLS first) then contextual, per crop (the
        # tower's own returned indices are out of reach: it is called as .forward, no hooks)
        seen.setdefault("zipped", args[0].detach().clone())

    return seen, [
        model.get_model().register_forward_pre_hook(language, with_kwargs=True),
        model.get_vision_tower().vision_tower.register_forward_hook(clip),
        model.get_model().mm_projector.register_forward_hook(projector),
    ]


def _dominant(hidden, zipped, dominant: int) -> list[set]:
    """Per crop, the token positions (0 = CLS) whose feature-layer states the published
    code kept as dominant: its first ``dominant`` output states, found among the tower's."""
    kept = []
    for p in range(hidden.shape[0]):
        dist = (zipped[p, :dominant, None, :] - hidden[p, None, :, :]).abs().amax(dim=-1)  # (D, 577)
        kept.append(set(dist.argmin(dim=1).tolist()))
        if float(dist.min(dim=1).values.max()) > 0 or len(kept[-1]) != dominant:
            raise SystemExit("a dominant state is not one of the tower's states")
    return kept


def _identify(model, hidden, kept, rows):
    """Each sent row as p*576+j (an original patch), or NEW (a CLS state or a merged token);
    and the partitions whose CLS state each NEW row equals (-1: merged). A row equal to a
    patch the published code did not keep as dominant (``kept``, its own indices) is a
    contextual token no other patch joined (its target's state alone): NEW."""
    import torch

    with torch.inference_mode():
        projected = model.get_model().mm_projector(hidden)  # (P, 577, D): CLS at 0, then the patches
    P = projected.shape[0]
    flat = projected.reshape(P * (N_TOKENS + 1), -1)
    order, cls_of = [], []
    for row in rows:
        dist = (flat - row).abs().max(dim=1).values
        best = int(dist.argmin())
        p, j = divmod(best, N_TOKENS + 1)
        if float(dist[best]) > 1e-5:  # no original matches: a merged contextual token
            order.append(NEW)
            cls_of.append(-1)
        elif j == 0:
            order.append(NEW)
            cls_of.append(p)
        elif j not in kept[p]:
            order.append(NEW)
            cls_of.append(-1)
        else:
            order.append(p * N_TOKENS + j - 1)
            cls_of.append(-1)
    return order, cls_of


def run_published(work: pathlib.Path, out_path: pathlib.Path, budgets=BUDGETS) -> None:
    """Run the published code at ``budgets``; their cases replace those in ``out_path``
    (when it exists), the other budgets' cases are kept."""
    import numpy as np
    import torch
    import transformers
    from safetensors.torch import load_file
    from visionzip import visionzip

    hired = hired_golden_script()
    meta = json.loads((work / "prepared.json").read_text())
    state = load_file(str(work / "ours" / "model.safetensors"))
    if hired.weights_digest(state) != meta["weights_sha256"]:
        raise SystemExit("the checkpoint is not the prepared one")
    config = json.loads((work / "ours" / "config.json").read_text())
    cases = []
    for budget in budgets:
        dominant, contextual = meta["visionzip"][str(budget)]
        model = visionzip(_llava_model(work, state, config), dominant=dominant, contextual=contextual)
        for k, item in enumerate(meta["items"][:N_IMAGES]):
            pixels = torch.from_numpy(np.load(work / f"ours_pixels{k}.npy"))
            ids = torch.tensor([[IMAGE_TOKEN_INDEX if i == meta["image_token_id"] else i for i in item["input_ids"]]])
            seen, handles = _capture(model)
            try:
                with torch.inference_mode():
                    out = model.generate(
                        ids,
                        images=[pixels],
                        image_sizes=[(item["width"], item["height"])],  # LLaVA: PIL's (width, height)
                        do_sample=False,
                        max_new_tokens=hired.MAX_NEW_TOKENS,
                        min_new_tokens=hired.MAX_NEW_TOKENS,
                    )
            finally:
                for h in handles:
                    h.remove()
            # generate from inputs_embeds returns the BOS it starts from, then the new tokens
            greedy = out[0].tolist()[-hired.MAX_NEW_TOKENS :]
            pos = item["input_ids"].index(meta["image_token_id"])
            n_visual = seen["embeds"].shape[1] - (len(item["input_ids"]) - 1)
            rows = seen["embeds"][0, pos : pos + n_visual]
            kept = _dominant(seen["hidden"], seen["zipped"], dominant)
            order, cls_of = _identify(model, seen["hidden"], kept, rows)
            cases.append(
                {
                    "height": item["height"],
                    "width": item["width"],
                    "seed": item["seed"],
                    "budget": budget,
                    "dominant": dominant,
                    "contextual": contextual,
                    "n_sent": n_visual,
                    "order": order,
                    "cls_of": cls_of,
                    "row_norms": [round(float(v), 6) for v in rows.norm(dim=-1)],
                    "greedy_ids": greedy,
                }
            )
            print(
                f"{item['height']}x{item['width']} budget {budget}: sent {n_visual}, ids {out[0].tolist()}", flush=True
            )
    golden = {
        "about": "What the published VisionZip code (dvlab-research/VisionZip 3151f6d on haotian-liu/LLaVA c121f04, "
        "transformers 4.37.2) sends to the language model on the tiny checkpoint below; "
        "made by tests/data/make_visionzip_golden.py",
        "published_transformers": transformers.__version__,
        "torch": torch.__version__,
        "checkpoint": {"seed": hired.CHECKPOINT_SEED, "widths": hired.WIDTHS, "weights_sha256": meta["weights_sha256"]},
        "question": hired.QUESTION,
        "max_new_tokens": hired.MAX_NEW_TOKENS,
        "pixels": "golden_pixels(shape, seed) of make_reference_golden.py fed to the published code and to ours",
        "cases": cases,
    }
    if out_path.exists():  # keep the cases of the budgets not run now
        kept = [c for c in json.loads(out_path.read_text())["cases"] if c["budget"] not in budgets]
        golden["cases"] = sorted(kept + cases, key=lambda c: BUDGETS.index(c["budget"]))
    out_path.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {out_path} ({out_path.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "prepare":
        prepare(pathlib.Path(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "run-published":
        budgets = [float(b) for b in sys.argv[4:]] or BUDGETS
        run_published(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), budgets)
    else:
        raise SystemExit(
            "usage: make_visionzip_golden.py prepare WORKDIR | run-published WORKDIR OUT.json [BUDGET ...]"
        )
