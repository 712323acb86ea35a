"""``hired-batch calibrate``: settings, the sample (reproducible, every grid), the printed
command, the refusals before Ray, and (slow, one Ray session) the whole run on the tiny model."""

import json
import shlex

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hired_batch.bench import calibrate
from hired_batch.bench.calibrate import DEFAULT_TRY, Setting, parse_settings, run_command
from hired_batch.config import ConfigError
from hired_batch.job import job_from_options
from hired_batch.job.sample import MIN_SAMPLE, draw_sample, stratified_counts

# --------------------------------------------------------------------------- settings


def test_the_default_settings_parse():
    settings = parse_settings(DEFAULT_TRY)
    assert [s.name for s in settings] == DEFAULT_TRY.split(",")
    assert settings[0] == Setting("full", "full", 1.0)
    assert settings[2].selector == "hired" and settings[2].budget == 0.2


def test_full_is_added_as_the_reference():
    assert [s.name for s in parse_settings("hired:0.2")] == ["full", "hired:0.2"]


@pytest.mark.parametrize(
    "text, says",
    [
        ("hired:0.2,fancy:0.3", "unknown setting 'fancy:0.3'"),
        ("hired:abc", "BUDGET a fraction"),
        ("hired:1.5", "(0, 1]"),
        ("full:0.5", "takes no budget"),
        ("hired:0.2,hired:0.2", "twice"),
    ],
)
def test_bad_settings_are_refused(text, says):
    with pytest.raises(ConfigError, match=None) as e:
        parse_settings(text)
    assert says in str(e.value)


def test_the_run_command_is_the_calibrate_command_with_the_setting():
    words = shlex.split(
        "hired-batch calibrate --input in/ --output out/ --model m --sample 40 --try=full,hired:0.5 "
        "--target 0.9 --truth-column label --metric exact --gpu l4 --report r.json --plot p.png "
        "--workdir w --sample-seed 3 --max-new-tokens 8"
    )
    got = run_command(words, Setting("hired:0.5", "hired", 0.5))
    assert got == shlex.split(
        "hired-batch run --input in/ --output out/ --model m --max-new-tokens 8 --selector hired --budget 0.5"
    )
    assert run_command(["python", "-m", "hired_batch", "calibrate", "--input", "x"], Setting("full", "full", 1.0)) == [
        "python", "-m", "hired_batch", "run", "--input", "x", "--selector", "full",
    ]  # fmt: skip


# --------------------------------------------------------------------------- the sample


def test_stratified_counts_against_hand_computed_cases():
    assert stratified_counts({"1x1": 90, "2x2": 10}, 10) == {"1x1": 9, "2x2": 1}
    # every stratum once, then the rest to the furthest below its share (98 * 10 / 100 = 9.8)
    assert stratified_counts({"a": 98, "b": 1, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    assert stratified_counts({"a": 5, "b": 5}, 3) == {"a": 2, "b": 1}  # a tie: the first
    assert stratified_counts({"a": 2, "b": 50}, 30) == {"a": 1, "b": 29}  # shares 1.15 and 28.85
    assert stratified_counts({"a": 3, "b": 4}, 10) == {"a": 3, "b": 4}  # asked for more than there is
    with pytest.raises(ValueError):
        stratified_counts({"a": 5, "b": 5, "c": 5}, 2)


def _input(path, n, id_column=True, bad_rows=()):
    """A demo-style input (six image sizes in turn: several anyres grids); ``bad_rows`` get bytes that are no image."""
    from hired_batch.demo import write_demo_parquet

    write_demo_parquet(str(path / "data.parquet"), n)
    t = pq.read_table(path / "data.parquet")
    images = t.column("image").to_pylist()
    for i in bad_rows:
        images[i] = b"not an image"
    t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    t = t.append_column("label", pa.array([f"label {i % 3}" for i in range(n)]))
    if not id_column:
        t = t.drop_columns(["id"])
    pq.write_table(t, path / "data.parquet", row_group_size=16)
    return path


def _job(inp, model, out):
    return job_from_options({"input": str(inp), "output": str(out), "model": str(model)})


def test_the_sample_is_reproducible_and_holds_every_grid(tmp_path, tiny_next):
    inp = _input(tmp_path / "in", 90, bad_rows=(0, 7))
    job = _job(inp, tiny_next, tmp_path / "out")
    a = draw_sample(job, 40, seed=1, directory=str(tmp_path / "a"))
    b = draw_sample(job, 40, seed=1, directory=str(tmp_path / "b"))
    c = draw_sample(job, 40, seed=2, directory=str(tmp_path / "c"))
    assert a.ids == b.ids and a.ids != c.ids
    assert len(a.ids) == 40 and a.usable == 88 and a.pool == 90  # the two bad images are not usable
    assert "demo-0000" not in a.ids and "demo-0007" not in a.ids
    assert set(a.grids) == set(a.pool_grids) and len(a.grids) >= 3  # every grid of the input is there
    assert a.grids == stratified_counts(a.pool_grids, 40)
    written = pq.read_table(a.path)
    assert written.column("id").to_pylist() == list(a.ids) and "label" in written.column_names


def test_generated_ids_are_the_ids_the_job_gives(tmp_path, tiny_next):
    inp = _input(tmp_path / "in", 40, id_column=False)
    sample = draw_sample(_job(inp, tiny_next, tmp_path / "out"), 35, seed=0, directory=str(tmp_path / "s"))
    rows = {int(i.split("#")[1]) for i in sample.ids}
    assert all(i.startswith("data.parquet#") for i in sample.ids) and len(rows) == 35
    # the id names the row of the file: its label is that row's
    t = pq.read_table(sample.path).to_pylist()
    assert all(r["label"] == f"label {int(r['id'].split('#')[1]) % 3}" for r in t)


def _folder(path, n, broken=()):
    """``n`` images of three anyres grids in a folder (one in a subfolder), ``broken`` ones not images."""
    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

    sizes = [(400, 300), (300, 700), (700, 300)]
    for i in range(n):
        f = path / ("sub" if i == 0 else "") / f"p{i:03d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        w, h = sizes[i % 3]
        f.write_bytes(b"not an image" if i in broken else image_to_bytes(make_synthetic_image(w, h, i)))
    return path


def test_a_folder_of_images_is_sampled_by_grid_with_the_jobs_ids(tmp_path, tiny_next):
    folder = _folder(tmp_path / "photos", 36, broken=(5,))
    job = job_from_options(
        {
            "input": str(folder),
            "output": str(tmp_path / "out"),
            "model": str(tiny_next),
            "question_column": "none",
            "prompt": "Describe the image.",
        }
    )
    a = draw_sample(job, 31, seed=3, directory=str(tmp_path / "a"))
    assert a.usable == 35 and a.input_rows == 36 and len(a.ids) == 31 and "p005.png" not in a.ids
    assert len(a.grids) == 3 and a.grids == stratified_counts(a.pool_grids, 31)
    t = pq.read_table(a.path)
    assert t.column("id").to_pylist() == list(a.ids)  # the ids the folder job gives: relative paths
    assert all(p.endswith("/" + i) for p, i in zip(t.column("image").to_pylist(), a.ids))
    assert "sub/p000.png" in draw_sample(job, 35, seed=3, directory=str(tmp_path / "b")).ids


def test_a_truth_column_is_refused_for_a_folder(capsys, tmp_path, tiny_next):
    folder = _folder(tmp_path / "photos", 31)
    code, err = _calibrate_before_ray(
        capsys, "--input", str(folder), "--output", str(tmp_path / "o"), "--model", str(tiny_next),
        "--question-column", "none", "--prompt", "Describe.", "--truth-column", "label", "--metric", "exact",
    )  # fmt: skip
    assert code == 2 and "a folder of images has no columns" in err and len(err.splitlines()) == 1, err


def test_too_few_usable_rows_are_refused(tmp_path, tiny_next):
    inp = _input(tmp_path / "in", 33, bad_rows=(1, 2, 3, 4))
    with pytest.raises(ConfigError, match=f"at least {MIN_SAMPLE} usable rows .* found 29"):
        draw_sample(_job(inp, tiny_next, tmp_path / "out"), 200, seed=0, directory=str(tmp_path / "s"))


# --------------------------------------------------------------------------- refused before Ray


def _calibrate_before_ray(capsys, *argv):
    import ray

    from hired_batch.cli import main

    code = main(["calibrate", *argv])
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "configuration errors must be found before Ray starts"
    return code, err


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--try", "full,magic:0.2"], "unknown setting 'magic:0.2'"),
        (["--sample", "10"], f"--sample must be at least {MIN_SAMPLE}"),
        (["--target", "0"], "--target must be an agreement share in (0, 1]"),
        (["--target", "1.5"], "--target must be an agreement share in (0, 1]"),
        (["--truth-column", "nope", "--metric", "exact"], "--truth-column 'nope': expected a column of the input"),
        (["--truth-column", "label"], "--truth-column and --metric go together"),
        (["--truth-column", "label", "--metric", "bleu"], "--metric must be one of"),
        (["--budget", "0.3"], "drop --budget"),
        (["--gpu", "tpu"], "--gpu must be one of"),
    ],
)
def test_mistakes_are_one_line_before_ray(capsys, tmp_path, tiny_next, extra, says):
    inp = _input(tmp_path / "in", 40)
    code, err = _calibrate_before_ray(
        capsys, "--input", str(inp), "--output", str(tmp_path / "o"), "--model", str(tiny_next), *extra
    )
    assert code == 2 and says in err and len(err.splitlines()) == 1, err


def test_a_sample_too_small_is_refused_before_ray(capsys, tmp_path, tiny_next):
    inp = _input(tmp_path / "in", 20)
    code, err = _calibrate_before_ray(
        capsys, "--input", str(inp), "--output", str(tmp_path / "o"), "--model", str(tiny_next)
    )
    assert code == 2 and f"at least {MIN_SAMPLE} usable rows" in err and "found 20" in err


# --------------------------------------------------------------------------- the report without Ray


def test_the_table_and_the_plot_from_a_report(tmp_path):
    share = {"value": 1.0, "low": 0.9, "high": 1.0, "n": 40}
    low = {"value": 0.5, "low": 0.35, "high": 0.65, "n": 40}

    def row(name, agree, speed):
        return {
            "setting": name, "items_per_s": speed, "engine_items_per_s": speed * 2, "ideal_items_per_s": 100.0,
            "cost_per_million": 8.3, "agreement": {"exact": agree, "anls": agree, "fields": None}, "accuracy": None,
        }  # fmt: skip

    report = {
        "sample": {"rows": 40},
        "target": 0.95,
        "target_measure": "exact",
        "gpu": {"name": "h100", "usd_per_hour": 3.0},
        "truth": None,
        "settings": [row("full", share, 1.0), row("hired:0.2", low, 2.0)],
        "recommendation": {"setting": "full", "meets_target": False, "reason": "none meets it", "command": "x"},
    }
    text = calibrate.format_report(report)
    assert "full *" in text and "0.500 [0.35, 0.65]" in text and "fields" not in text.splitlines()[0]
    png = calibrate.plot_report(report, str(tmp_path / "p.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- end to end (one Ray session)


@pytest.mark.slow
def test_calibrate_end_to_end_and_the_printed_command(tmp_path, tiny_llava, capsys, monkeypatch):
    """One Ray session: calibrate on the tiny LLaVA-1.5 model (one crop, no image-newline
    tokens: hired:1.0 sends exactly full's 576 tokens, so it agrees 100 %; on LLaVA-NeXT
    it would not, as selectors send no newline tokens), the report and plot, then the
    printed run command, run as printed, gives the same answers on the sample's rows."""
    import ray

    from hired_batch.cli import main

    monkeypatch.chdir(tmp_path)
    _input(tmp_path / "in", 36)
    try:
        code = main(
            ["calibrate", "--input", "in/", "--output", "answers/", "--model", str(tiny_llava), "--sample", "30",
             "--try", "full,hired:1.0,random:0.2", "--target", "0.85", "--max-new-tokens", "4", "--num-cpus", "2",
             "--truth-column", "label", "--metric", "exact", "--report", "r.json", "--plot", "p.png",
             "--workdir", "w"]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, f"{out}\n{err[-3000:]}"
        report = json.loads((tmp_path / "r.json").read_text())
        rows = {r["setting"]: r for r in report["settings"]}
        assert (
            rows["hired:1.0"]["agreement"]["exact"]["value"] == 1.0
            and rows["hired:1.0"]["agreement"]["exact"]["n"] == 30
        )
        assert rows["hired:1.0"]["mean_visual_tokens"] == rows["full"]["mean_visual_tokens"]
        assert rows["random:0.2"]["mean_visual_tokens"] < rows["full"]["mean_visual_tokens"]
        assert rows["full"]["accuracy"]["n"] == 30 and rows["full"]["ideal_items_per_s"] > 0
        assert report["sample"]["rows"] == 30 and report["sample"]["grids"] == {"1x1": 30}
        rec = report["recommendation"]
        assert rec["meets_target"] and rows[rec["setting"]]["agreement"]["exact"]["low"] >= 0.85
        assert (tmp_path / "p.png").stat().st_size > 0 and rec["command"] in out and "*" in out
        # the printed command, run as printed (the same Ray), answers the sample's rows as calibrate did
        words = shlex.split(out.split("run it on the whole input:\n")[1].splitlines()[0])
        selector, _, budget = rec["setting"].partition(":")
        tail = words[words.index("run") + 1 :]
        if selector == "full":
            assert tail[-2:] == ["--selector", "full"]
        else:
            assert tail[-4:-2] == ["--selector", selector] and float(tail[-1]) == float(budget)
        assert main(words[words.index("run") :]) == 0
        full_run = pq.read_table(tmp_path / "answers").to_pylist()
        assert len(full_run) == 36
        slug = rec["setting"].replace(":", "_")
        on_sample = {r["id"]: r["answer"] for r in pq.read_table(tmp_path / "w" / "runs" / slug).to_pylist()}
        assert {r["id"]: r["answer"] for r in full_run if r["id"] in on_sample} == on_sample
    finally:
        ray.shutdown()


def test_cost_per_million_items():
    from hired_batch.bench.gpus import GPUS, cost_per_million

    assert cost_per_million(1000.0, 3.6) == pytest.approx(1.0)  # 1000 s of a $3.60 hour
    assert cost_per_million(0.0, 3.0) == float("inf")
    assert all(g.tflops > 0 and g.mem_bw_gbs > 0 and g.usd_per_hour > 0 for g in GPUS.values())
