"""``hired-batch plan``: its per-row checks and totals, the ideal model's prediction, the
report, the flags shared with ``run``, the refusals before Ray, and (slow) its counts
against what the job then does on the same mixed good/bad input."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.cli import run_before_ray

from hired_batch.bench import ideal
from hired_batch.bench.gpus import GPUS, Gpu, get_gpu
from hired_batch.bench.model_sizes import get_preset
from hired_batch.bench.plan_report import (
    VLLM_MAX_SEQS,
    PlanReport,
    Prediction,
    Tally,
    TokenCheck,
    batch_for,
    plan_table,
    plot,
    predict,
    size_bin,
)
from hired_batch.bench.scale_data import BAD_KINDS, expected_failures, write_shards
from hired_batch.config import ConfigError, GenerationConfig, SelectionConfig
from hired_batch.engine import backends, token_plan
from hired_batch.engine.dims import ItemTokens
from hired_batch.job.stages import context_error

GEO = token_plan.Geometry(n_tokens=576, crop_px=336, pinpoints=((336, 672), (672, 336), (672, 672)), newline=True)
SEL = SelectionConfig(selector="hired", budget=0.2)
CHECK = TokenCheck(GEO, SEL, GenerationConfig(max_new_tokens=16), max_positions=4096)
SEVEN_B = get_preset("llava-next-7b").dims(2)


def handoff(rows) -> pa.Table:
    """A preprocessing stage's output table: (id, error, n prompt ids, (h, w), sampling)."""
    types = backends.COMMON_HANDOFF
    cols = {
        "id": [r[0] for r in rows],
        "error": [r[1] for r in rows],
        "input_ids": [b"\0" * 8 * r[2] for r in rows],
        "image_h": [r[3][0] for r in rows],
        "image_w": [r[3][1] for r in rows],
        "t_preprocess_s": [0.5] * len(rows),
        "sampling": [r[4] for r in rows],
    }
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def test_plan_rows_carry_the_jobs_errors_and_token_plan():
    rows = [
        ("ok", None, 20, (480, 640), None),
        ("bad-image", "image: not an image (cannot identify format)", 0, (0, 0), None),
        ("long", None, 4000, (672, 672), None),  # 4000 text ids + visual + 16 new > 4096
        ("long-answer", None, 20, (336, 336), json.dumps({"max_new_tokens": 4000})),  # its own answer length
        ("bad-options", None, 20, (336, 336), json.dumps({"no_such_option": 1})),
    ]
    t = plan_table(handoff(rows), CHECK, measured=True)
    got = dict(zip(t.column("id").to_pylist(), t.column("error").to_pylist()))
    assert got["ok"] is None and got["bad-image"] == rows[1][1]
    n_long = token_plan.item_tokens((672, 672), SEL, GEO, 4000).n_prompt
    assert got["long"] == context_error(n_long, 16, 4096) is not None
    n_short = token_plan.item_tokens((336, 336), SEL, GEO, 20).n_prompt
    assert got["long-answer"] == context_error(n_short, 4000, 4096) is not None
    assert got["bad-options"] and "no_such_option" in got["bad-options"]  # row_generation's own refusal
    ok = t.filter(t.column("error").is_null()).to_pylist()[0]
    assert ok["n_visual"] == token_plan.visual_tokens((480, 640), SEL, GEO)
    assert ok["n_visual_full"] == token_plan.full_count((480, 640), GEO)
    assert ok["n_text"] == 19 and ok["n_crops"] == token_plan.n_parts(token_plan.grid_of((480, 640), GEO))
    from hired_batch.engine.handoff import item_bytes

    first = handoff(rows).to_pylist()[0]  # the job's own count of what crosses the object store
    assert t.column("handoff_bytes").to_pylist()[0] == item_bytes(first.values()) >= 8 * 20


def test_tally_counts_rows_errors_sizes_and_the_timed_data_path():
    tally = Tally()
    a = plan_table(handoff([("a", None, 20, (480, 640), None), ("b", "image: x", 0, (0, 0), None)]), CHECK, True, 0.25)
    b = plan_table(handoff([("c", None, 20, (3000, 4000), None), ("d", "image: x", 0, (0, 0), None)]), CHECK, False)
    tally.add(a)
    tally.add(b)
    assert (tally.rows, tally.ok, tally.failed) == (4, 2, 2)
    assert tally.errors == Counter({"image: x": 2})
    assert tally.sizes == Counter({size_bin(640): 1, size_bin(4000): 1}) and size_bin(640) != size_bin(4000)
    assert sum(tally.visual.values()) == 2 and sum(k for _, k in tally.item_tokens()) == 2
    # only the measured table's rows are timed: 2 rows in 0.25 CPU-seconds, 0.5 s of wall each
    assert tally.measured_rows == 2 and tally.items_per_cpu_s == pytest.approx(8.0)
    assert tally.items_per_wall_s == pytest.approx(2.0)


def test_prediction_is_the_ideal_model_on_the_plans_items():
    tally = Tally(rows=30, failed=0, measured_rows=10, measured_cpu_s=5.0)
    a, b = ItemTokens(5, 576, 20), ItemTokens(3, 346, 40)
    tally.items.update({(5, 576, 20, -1): 10, (3, 346, 40, -1): 20})
    gpu = Gpu("toy", 100.0, 1000.0, 80.0, 2.0, "toy")
    p = predict(tally, SEVEN_B, gpu, "hf", 32, 4)
    roof = ideal.Roofline(100e12, 1000e9)
    seconds = sum(k * ideal.batch_time(SEVEN_B, [i] * 4, 32, roof).total_s / 4 for i, k in ((a, 10), (b, 20)))
    assert p.batch_size == 4 and p.items_per_s == pytest.approx(30 / seconds)
    assert p.gpu_hours == pytest.approx(seconds / 3600) and p.cost_usd == pytest.approx(2.0 * seconds / 3600)
    assert p.cpus_per_gpu == pytest.approx(p.items_per_s / 2.0)  # 10 rows in 5 CPU-seconds: 2 items/s per CPU
    twice = predict(tally, SEVEN_B, Gpu("2x", 200.0, 2000.0, 80.0, 2.0, "2x"), "hf", 32, 4)
    assert twice.gpu_hours == pytest.approx(p.gpu_hours / 2)  # a roofline twice as fast: half the hours


def test_auto_batches_follow_the_gpus_memory():
    items = [ItemTokens(5, 496, 20), ItemTokens(3, 346, 20)]
    h100, l4 = get_gpu("h100"), get_gpu("l4")
    assert batch_for("hf", SEVEN_B, items, 32, h100, "auto", 8) > batch_for("hf", SEVEN_B, items, 32, l4, "auto", 8)
    assert 1 <= batch_for("vllm", SEVEN_B, items, 32, h100, "auto", 8) <= VLLM_MAX_SEQS
    assert batch_for("hf", SEVEN_B, items, 32, l4, 6, 8) == 6  # a number is the batch
    tiny_card = Gpu("tiny", 1.0, 1.0, 10.0, 1.0, "10 GB: the 7B weights alone do not fit")
    tally = Tally(rows=1)
    tally.items[(5, 496, 20, -1)] = 1
    assert predict(tally, SEVEN_B, tiny_card, "vllm", 32, "auto").batch_size is None


def test_gpu_types_and_prices():
    assert get_gpu("H100") == GPUS["h100"]
    assert get_gpu("l4", 0.5).usd_per_hour == 0.5 and GPUS["l4"].usd_per_hour != 0.5
    with pytest.raises(ConfigError, match="--gpu must be one of"):
        get_gpu("tpu")
    with pytest.raises(ConfigError, match="--gpu-price"):
        get_gpu("h100", 0)


def test_report_json_summary_and_plot(tmp_path):
    tally = Tally()
    rows = [("a", None, 20, (480, 640), None), ("b", "image: x", 0, (0, 0), None)]
    tally.add(plan_table(handoff(rows), CHECK, True, cpu_s=0.5))
    pred = Prediction("hf", "h100", 2.99, 8, 10.0, 0.5, 1.5, 4.0)
    none = Prediction("vllm", "l4", 0.8, None, None, None, None, None)
    report = PlanReport(tally, "hired 20%", "hf", "llava-next-7b shapes", 16, 2.0, 2.0, 1, (pred, none))
    d = json.loads(json.dumps(report.as_dict()))
    assert (d["rows"], d["ok"], d["failed"]) == (2, 1, 1) and d["errors"] == {"image: x": 1}
    assert d["data_path"]["items_per_s_per_cpu"] == pytest.approx(4.0) and d["plan_rows_per_s_per_cpu"] == 0.5
    assert d["predictions"][0]["gpu_hours"] == 0.5 and d["predictions"][1]["batch_size"] is None
    text = report.format()
    assert "would fail 1" in text and "image: x" in text and "| hf | h100 | 2.99 | 8 |" in text
    assert "does not fit" in text
    plot(report, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_the_count_path_decides_every_row_as_the_engines_preprocessing(tiny_next):
    """PlanStage outside Ray: a batch through the HF engine's whole preprocessing (timed)
    and the same batch through the count path give the same errors and token plans."""
    import numpy as np

    from hired_batch.bench.plan import PlanStage, plan_job, token_check
    from hired_batch.bench.scale_data import images, shard_table

    job = plan_job({"input": ["unused"], "model": str(tiny_next)}, "unused")
    check, _ = token_check(job)
    stage = PlanStage(str(tiny_next), job.columns, job.limits, None, "hf", check, measure_every=2)
    rows = shard_table(0, 16, 2, images()).to_pydict()  # every second row bad, each kind twice
    batch = {k: np.array(v, dtype=object) for k, v in rows.items()}
    full, count = stage(batch), stage(batch)
    assert full.column("measured").to_pylist() == [True] * 16 and not any(count.column("measured").to_pylist())
    same = ["id", "error", "image_h", "image_w", "n_crops", "n_visual", "n_visual_full", "n_text", "n_projected"]
    assert full.select(same).equals(count.select(same))
    assert full.column("error").null_count == 8 and full.column("cpu_s").to_pylist()[0] > 0
    pixels = full.column("handoff_bytes").to_pylist()[0]
    assert pixels > count.column("handoff_bytes").to_pylist()[0] + 500  # the engine's handoff carries the image


def test_scale_data_writes_the_bad_rows_it_promises(tmp_path):
    write_shards(tmp_path, rows=203, shards=3, bad_every=10)
    t = pq.read_table(tmp_path)
    assert t.num_rows == 203 and len(set(t.column("id").to_pylist())) == 203
    counts = expected_failures(203, 10)
    assert set(counts) == set(BAD_KINDS) and sum(counts.values()) == 20
    assert t.column("question").null_count == counts["null_question"]


def test_plan_takes_every_run_flag():
    """plan's flags come from the same option declarations as run's: one --config serves both."""
    from hired_batch.cli import build_parser
    from hired_batch.job.options import run_options

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {s for a in sub["plan"]._actions for s in a.option_strings}
    assert {o.flag for o in run_options()} <= flags
    assert {"--gpu", "--gpu-price", "--engines", "--report", "--plot"} <= flags


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--gpu", "tpu"], "--gpu must be one of"),
        (["--gpu", "h100,l4", "--gpu-price", "2"], "--gpu-price is the price of one GPU type"),
        (["--engines", "hf,trt"], "--engines takes"),
        (["--measure-every", "0"], "--measure-every must be >= 1"),
        (["--preset", "huge"], "preset must be one of"),
        (["--budget", "2"], "budget"),  # the job's own option check
    ],
)
def test_mistakes_are_one_line_before_ray(capsys, tmp_path, tiny_next, argv, expected):
    write_shards(tmp_path / "in", rows=4, shards=1, bad_every=0)
    code, err = run_before_ray(
        capsys, "--input", str(tmp_path / "in"), "--model", str(tiny_next), *argv, command="plan"
    )
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_plan_without_input_asks_for_it_alone(capsys, tiny_next):
    code, err = run_before_ray(capsys, "--model", str(tiny_next), command="plan")
    assert code == 2 and "--input is required" in err and "--output" not in err


@pytest.mark.slow
def test_plan_counts_equal_what_the_job_then_does(tiny_next, tmp_path, capsys):
    """One embedded Ray: plan, then the job, on 24 rows with 8 bad ones (two of each kind,
    from the preprocessing stage and the generation stage's context check)."""
    import ray

    from hired_batch.cli import main

    write_shards(tmp_path / "in", rows=24, shards=2, bad_every=3)
    common = ["--input", str(tmp_path / "in"), "--model", str(tiny_next), "--max-new-tokens", "3", "--batch-size", "4"]
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        report = tmp_path / "plan.json"
        assert main(["plan", *common, "--measure-every", "2", "--report", str(report), "--gpu", "h100,l4"]) == 0
        out = capsys.readouterr().out
        main(["run", *common, "--output", str(tmp_path / "out"), "--max-failed-fraction", "1"])
    finally:
        ray.shutdown()
    plan = json.loads(report.read_text())
    job = pq.read_table(tmp_path / "out")
    errors = Counter(job.column("error").drop_null().to_pylist())
    assert (plan["rows"], plan["failed"]) == (job.num_rows, sum(errors.values())) == (24, 8)
    assert plan["errors"] == dict(errors) and len(errors) == len(BAD_KINDS)
    kept = Counter(job.filter(job.column("error").is_null()).column("n_visual_tokens_kept").to_pylist())
    assert plan["visual_tokens_per_item"] == {str(k): v for k, v in kept.items()}
    assert plan["data_path"]["measured_rows"] > 0 and plan["data_path"]["items_per_s_per_cpu"] > 0
    assert [(p["engine"], p["gpu"]) for p in plan["predictions"]] == [("hf", "h100"), ("hf", "l4")]
    assert all(p["gpu_hours"] > 0 for p in plan["predictions"])
    assert "rows: 24 (ok 16, would fail 8" in out
