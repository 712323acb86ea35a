"""The bench CLI on the tiny preset: table, JSON rows, PNG, auto batch size."""

import json
import os

import pytest

from hired_batch import cli
from hired_batch.bench import engine_bench, ideal
from hired_batch.bench.engine_bench import ROW_KEYS
from hired_batch.bench.workload import DRAWN_SHORTEST, SIZES, answer_lengths
from hired_batch.config import SelectionConfig
from hired_batch.jsonio import json_safe


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("presets"))


def _bench(cache, tmp_path, *extra):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    rc = cli.main(
        [
            "bench",
            "--preset",
            "tiny",
            "--cache-dir",
            cache,
            "--max-new-tokens",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--json",
            str(out),
            "--plot",
            str(png),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())["rows"], png


@pytest.mark.slow
def test_bench_writes_rows_table_and_plot(cache, tmp_path, capsys, monkeypatch):
    titles, real = [], engine_bench.plot_figure
    monkeypatch.setattr(engine_bench, "plot_figure", lambda rows, title: titles.append(title) or real(rows, title))
    rows, png = _bench(cache, tmp_path, "--selectors", "full,hired:0.2,hired:0.1", "--batch-sizes", "1,2")
    assert [(r["selector"], r["budget"], r["batch_size"]) for r in rows] == [
        ("full", 1.0, 1),
        ("hired", 0.2, 1),
        ("hired", 0.1, 1),
        ("full", 1.0, 2),
        ("hired", 0.2, 2),
        ("hired", 0.1, 2),
    ]
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert r["items_per_s"] > 0 and r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["peak_mem_bytes"] > 0 and 0 <= r["selection_share"] < 1
        assert r["speedup"] > 0 and r["ideal_speedup"] > 0
        assert r["est_mem_per_item_bytes"] > 0  # the memory model's estimate, next to the measured one
    for bs in (1, 2):
        vis = [r["visual_tokens_per_item"] for r in rows if r["batch_size"] == bs]
        assert vis[0] > vis[1] > vis[2]  # full > 20% > 10%
        assert [r["speedup"] for r in rows if r["batch_size"] == bs][0] == 1.0
        ideal = [r["ideal_speedup"] for r in rows if r["batch_size"] == bs]
        assert ideal[0] == 1.0 and ideal[1] > 1.0
    hired = [r for r in rows if r["selector"] == "hired"]
    assert all(r["selection_share"] > 0 for r in hired)  # t_select_s is measured
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles == ["hired-batch bench: preset tiny, cpu, float32"]
    out = capsys.readouterr().out
    assert "| selector | batch | items/s |" in out and "LM:vision FLOPs per token" in out
    # the header names the host's processor: rows from two hosts of one VM pool are not comparable
    machine = next(line for line in out.splitlines() if line.startswith("- machine: "))
    assert f"{len(os.sched_getaffinity(0))} CPUs (" in machine


@pytest.mark.slow
def test_bench_auto_batch_gives_hired_a_larger_batch(cache, tmp_path, capsys):
    from hired_batch.bench.model_sizes import PRESETS
    from hired_batch.engine import batching, dims

    d = PRESETS["tiny"].dims()
    probe = [ideal.item_tokens(d, hw, SelectionConfig(selector="full", budget=1.0), 16) for hw in SIZES]
    heavy = max(probe, key=lambda i: batching.batch_bytes(d, [i], 2, 8))
    one, two = (batching.batch_bytes(d, [heavy] * n, 2, 8) for n in (1, 2))
    limit = int(dims.weight_bytes(d) + (one + two) / 2 / 0.9)  # one full item fits, two do not
    rows, _ = _bench(
        cache,
        tmp_path,
        "--selectors",
        "full,hired:0.2",
        "--batch-sizes",
        "auto",
        "--memory-limit",
        str(limit),
        "--repeats",
        "2",
    )
    by = {r["selector"]: r for r in rows}
    out = capsys.readouterr().out
    for r in rows:  # the spread of the two repeats brackets their median, and is printed
        assert r["items_per_s_worst"] <= r["items_per_s"] <= r["items_per_s_best"]
        assert f"| {r['items_per_s_worst']:.3f}-{r['items_per_s_best']:.3f} |" in out
    # tiny's LM is as cheap as its vision tower, so pixels bound the pruned batch here;
    # the >= 3x claim is checked on the scaled / 7B shapes in test_batching.py
    assert by["full"]["batch_size"] == 1 and by["hired"]["batch_size"] >= 2
    assert all(r["batch_mode"] == "auto" for r in rows)
    assert "auto batch for hired:0.2" in out


def test_ideal_only_and_bad_flags(capsys):
    rc = cli.main(
        [
            "bench",
            "--ideal-only",
            "--preset",
            "llava-next-7b",
            "--peak-tflops",
            "100",
            "--mem-bw-gbs",
            "2000",
            "--selectors",
            "full,hired:0.2",
            "--batch-sizes",
            "1,auto",
            "--memory-limit",
            "80GB",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "| hired:0.2 | 1 |" in out and "(auto)" in out
    assert cli.main(["bench", "--selectors", "full,magic:0.2", "--ideal-only"]) == 2
    assert "magic" in capsys.readouterr().err
    assert cli.main(["bench", "--batch-sizes", "0"]) == 2
    assert cli.main(["bench", "--ideal-only", "--vision-chunk", "0"]) == 2
    assert "vision_chunk must be >= 1 crop, got 0" in capsys.readouterr().err  # the engine's check, config's message
    assert engine_bench.parse_selectors("full,hired:0.2") == [
        engine_bench.Spec("full", 1.0),
        engine_bench.Spec("hired", 0.2),
    ]


@pytest.mark.slow
def test_bench_pipeline_reports_job_items_per_s(cache, tmp_path, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        rows, _ = _bench(
            cache, tmp_path, "--selectors", "hired:0.2", "--batch-sizes", "2", "--items", "4", "--pipeline"
        )
    finally:
        ray.shutdown()
    (r,) = rows
    out = capsys.readouterr().out
    assert r["items"] == 4 and r["pipeline_items"] == [8, 4]
    wall2, wall1 = r["pipeline_wall_s"]
    assert wall2 > 0 and wall1 > 0
    # the tiny model's 4 extra items take less time than the noise in the fixed costs, so
    # either order of the walls can happen here: check the arithmetic, not the machine
    if wall2 > wall1:
        assert r["pipeline_items_per_s"] == pytest.approx(4 / (wall2 - wall1))
        assert r["pipeline_ratio"] == pytest.approx(r["pipeline_items_per_s"] / r["items_per_s"])
    else:  # undefined: null in the JSON (strict JSON has no NaN)
        assert r["pipeline_items_per_s"] is None and r["pipeline_ratio"] is None and "raise --items" in out
    assert all(b > 0 for b in r["pipeline_busy_items_per_s"]) and r["pipeline_e2e_items_per_s"] > 0
    assert r["pipeline_e2e_items_per_s"] == pytest.approx(4 / (r["pipeline_ray_start_s"] + wall1))
    assert "| job/engine |" in out
    # what crossed the object store per item: at most 1.2x the encoded image, plus prompt ids
    from hired_batch.bench.workload import workload
    from hired_batch.engine.inputs import image_to_bytes

    encoded = [len(image_to_bytes(im)) for im, _ in workload(8)]
    assert 0 < r["pipeline_handoff_bytes"] <= 1.2 * sum(encoded) / len(encoded) + 8 * 200  # ids: < 200 tokens


def test_json_rows_have_no_nan():
    rows = [dict(speedup=float("nan"), walls=[1.0, float("inf")], label="full")]
    safe = [json_safe(r) for r in rows]
    assert safe == [dict(speedup=None, walls=[1.0, None], label="full")]
    json.dumps(safe, allow_nan=False)  # would raise on NaN


def _row(label, batch, items_per_s, peak, walls=(1.0,)):
    return dict(
        label=label,
        selector=label.split(":")[0],
        batch_size=batch,
        batch_mode="fixed",
        items_per_s=items_per_s,
        items_per_s_best=items_per_s * 1.1,
        items_per_s_worst=items_per_s * 0.9,
        repeats=len(walls),
        visual_tokens_per_item=100,
        ttft_s=0.1,
        decode_tokens_per_s=10.0,
        peak_mem_bytes=peak,
        mem_per_item_bytes=peak / batch,
        selection_share=0.01,
        speedup=1.0,
        ideal_speedup=1.0,
        cpu_stall_share=0.0,
    )


def test_table_shows_the_spread_of_repeats():
    text = engine_bench.table([_row("full", 1, 2.0, 1e9, walls=(1.0, 1.2)), _row("hired:0.2", 1, 3.0, 1e9)])
    assert "| repeats: slowest-fastest |" in text.splitlines()[0]
    assert "| full | 1 | 2.000 | 1.800-2.200 |" in text
    assert "| hired:0.2 | 1 | 3.000 | - |" in text  # one repeat: no spread


def test_plot_has_a_title_integer_batch_ticks_and_axes_from_zero():
    rows = [
        _row(label, b, ips, peak)
        for label, b, ips, peak in [
            ("full", 1, 1.0, 3.0e9),
            ("full", 4, 2.0, 3.5e9),
            ("hired:0.2", 1, 2.5, 3.0e9),
            ("hired:0.2", 4, 6.0, 3.2e9),
        ]
    ]
    fig = engine_bench.plot_figure(rows, "hired-batch bench: preset tiny, cpu, float32")
    assert fig.get_suptitle() == "hired-batch bench: preset tiny, cpu, float32"
    throughput, memory = fig.axes
    for ax in (throughput, memory):
        assert list(ax.get_xticks()) == [1, 4]
        assert ax.get_ylim()[0] == 0
    assert memory.get_ylim()[1] >= 3.5


def test_quick_mode_shrinks_the_sweep_unless_flags_say_otherwise(capsys):
    from hired_batch.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick"])
    engine_bench.apply_defaults(args)
    assert (args.selectors, args.batch_sizes, args.repeats) == (
        engine_bench.QUICK_DEFAULTS["selectors"],
        engine_bench.QUICK_DEFAULTS["batch_sizes"],
        engine_bench.QUICK_DEFAULTS["repeats"],
    )
    args = build_parser().parse_args(["bench", "--quick", "--repeats", "5"])
    engine_bench.apply_defaults(args)
    assert args.repeats == 5 and args.selectors == engine_bench.QUICK_DEFAULTS["selectors"]
    args = build_parser().parse_args(["bench"])
    engine_bench.apply_defaults(args)
    assert (args.selectors, args.batch_sizes, args.repeats) == (engine_bench.DEFAULT_SELECTORS, "1,4", 3)
    # end to end without a model: the quick sweep's configurations only
    assert (
        cli.main(["bench", "--quick", "--ideal-only", "--preset", "tiny", "--peak-tflops", "1", "--mem-bw-gbs", "10"])
        == 0
    )
    rows = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [(a.strip(), b.strip()) for a, b in rows] == [
        ("full", "1"),
        ("hired:0.2", "1"),
        ("full", "2"),
        ("hired:0.2", "2"),
    ]


def test_help_explains_quick_and_cpu_stall(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--quick" in out and "CPU stall %: share of a repeat's wall time" in out and "PSI" in out


# --------------------------------------------------------------------------- --engine (the vLLM comparison)


def _without_vllm(monkeypatch):
    """This Python as if vLLM were not installed (the default test venv has none anyway)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--engine", "vllm"], "needs vLLM, which is not installed"),
        (["--engine", "hf,vllm", "--quick"], "needs vLLM, which is not installed"),
        (["--engine", "hf,gpu"], "--engine: expected a comma list"),
        (["--engine", "hf,vllm", "--batch-sizes", "1,4"], "takes one batch size"),
        (["--engine", "vllm", "--batch-sizes", "auto"], "takes one batch size"),
        (["--engine", "hf,vllm", "--pipeline", "--selectors", "full"], "--pipeline with --engine vllm runs"),
        (["--engine", "vllm", "--pipeline", "--workloads", "long"], "it needs a HiRED selector and the short"),
        (["--engine", "hf,vllm", "--ideal-only"], "--ideal-only is not available"),
        (["--engine", "vllm", "--mode", "reference"], "exact mode only"),
        (["--engine", "hf,vllm", "--workloads", "short,essay"], "--workloads: expected"),
        (["--engine", "hf,vllm", "--long-new-tokens", "0"], "--long-new-tokens must be >= 1"),
        (["--workloads", "short"], "--workloads belongs to the engine comparison"),
        (["--engine", "hf", "--long-new-tokens", "32"], "--long-new-tokens belongs to the engine comparison"),
        (["--long-lengths", "drawn"], "--long-lengths belongs to the engine comparison"),
    ],
)
def test_engine_flags_fail_fast_with_one_line(argv, says, monkeypatch, capsys):
    """Every mistake exits 2 with one line, before any model loads; flags are checked
    before vLLM's presence, so a typo is named even where vLLM is missing."""
    _without_vllm(monkeypatch)
    assert cli.main(["bench", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_engine_hf_is_the_plain_sweep(capsys):
    rc = cli.main(
        [
            "bench",
            "--engine",
            "hf",
            "--ideal-only",
            "--preset",
            "tiny",
            "--peak-tflops",
            "1",
            "--mem-bw-gbs",
            "10",
            "--selectors",
            "full,hired:0.2",
            "--batch-sizes",
            "1",
        ]
    )
    assert rc == 0 and "| hired:0.2 | 1 |" in capsys.readouterr().out


def test_drawn_answer_lengths_are_seeded_uneven_and_in_range():
    """The long workload on random weights: lengths drawn from [DRAWN_SHORTEST, longest],
    the same for the same seed (every configuration of a repeat), others for another."""
    a = answer_lengths(64, seed=1, longest=64)
    assert a == answer_lengths(64, seed=1, longest=64) and a != answer_lengths(64, seed=2, longest=64)
    assert min(a) >= DRAWN_SHORTEST and max(a) <= 64 and len(set(a)) > 16
    assert answer_lengths(3, seed=1, longest=4) == [4, 4, 4]  # a budget under the shortest: the budget


def test_the_preset_names_the_cli_offers_are_the_model_sizes():
    from hired_batch.bench import PRESET_NAMES
    from hired_batch.bench.model_sizes import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)
