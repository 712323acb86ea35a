"""``hired-batch bench --engine hf,vllm --quick`` on the tiny checkpoint: one run gives the
four configurations (stock vLLM full, vLLM + HiRED, HF full, HF HiRED) on both workloads.

Speeds on the tiny model mean nothing; the test checks that every row is there and says
what ran (token counts, answer lengths, ratios against the right reference).
"""

import json

from hired_batch import cli

CONFIGS = {
    ("vllm", "full"): "vllm full (stock)",
    ("vllm", "hired"): "vllm hired:0.2",
    ("hf", "full"): "hf full",
    ("hf", "hired"): "hf hired:0.2",
}


def test_quick_four_way_bench_writes_every_row(vllm_next, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HIRED_BATCH_CACHE", str(tmp_path / "cache"))  # the stock-vLLM copy goes here
    out, png = tmp_path / "engines.json", tmp_path / "engines.png"
    rc = cli.main(
        [
            "bench",
            "--engine",
            "hf,vllm",
            "--model",
            str(vllm_next),
            "--quick",
            "--items",
            "4",
            "--long-new-tokens",
            "12",
            "--long-lengths",
            "drawn",
            "--pipeline",
            "--warmup",
            "0",
            "--peak-tflops",
            "1",
            "--mem-bw-gbs",
            "10",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["workload"], r["label"]) for r in rows) == sorted(
        (w, label) for w in ("short", "long") for label in CONFIGS.values()
    )
    by = {(r["workload"], r["engine"], r["selector"]): r for r in rows}
    for w, max_new in (("short", 8), ("long", 12)):
        full, hired = by[w, "vllm", "full"], by[w, "vllm", "hired"]
        # the same items through both engines: equal visual tokens per selector
        assert full["visual_tokens_per_item"] == by[w, "hf", "full"]["visual_tokens_per_item"]
        assert hired["visual_tokens_per_item"] == by[w, "hf", "hired"]["visual_tokens_per_item"]
        assert hired["visual_tokens_per_item"] < 0.3 * full["visual_tokens_per_item"]
        assert full["vs_stock_vllm"] == 1.0 and full["speedup"] == 1.0
        for r in (by[w, e, s] for e, s in CONFIGS):
            assert r["items"] == 4 and r["repeats"] == 1 and r["items_per_s"] > 0 and r["ttft_s"] > 0
            assert r["ideal_speedup"] > (1.5 if r["selector"] == "hired" else 0.99)
            assert r["vs_stock_vllm"] > 0 and r["generated_tokens_max"] <= max_new
            if w == "short":  # fixed length: EOS suppressed
                assert r["generated_tokens_min"] == r["generated_tokens_max"] == max_new
    # long, drawn lengths: every configuration answers the same drawn lengths in [8, 12]; vLLM
    # decodes each answer's own length, a static HF batch (2 items) to its longer answer
    long = [by["long", e, s] for e, s in CONFIGS]
    assert (
        len({(r["generated_tokens_min"], r["generated_tokens_max"], r["generated_tokens_per_item"]) for r in long}) == 1
    )
    assert 8 <= long[0]["generated_tokens_min"] <= long[0]["generated_tokens_max"] <= 12
    for r in long:
        same = r["decoded_tokens_per_item"] == r["generated_tokens_per_item"]
        assert same if r["engine"] == "vllm" else r["decoded_tokens_per_item"] >= r["generated_tokens_per_item"]
    # --pipeline: the vLLM + HiRED short rows through the Ray job (--engine vllm), jobs of 8 and 4 items
    piped = [r for r in rows if "pipeline_items" in r]
    assert [(r["workload"], r["label"]) for r in piped] == [("short", "vllm hired:0.2")]
    assert piped[0]["pipeline_items"] == [8, 4] and all(w > 0 for w in piped[0]["pipeline_wall_s"])
    assert piped[0]["max_model_len"] % 256 == 0 and piped[0]["kv_cache_bytes"] > 0
    assert png.stat().st_size > 0
    table = capsys.readouterr().out
    assert "| short | vllm full (stock) | 2 |" in table and "| long | hf hired:0.2 | 2 |" in table
    assert "| vllm hired:0.2 | 2 |" in table.split("# pipeline")[1]  # the job-vs-engine table


def test_vllm_alone_loads_no_hf_model(vllm_next, tmp_path, monkeypatch):
    """``--engine vllm``: vLLM's engines only (the command for cards too small for both
    engines); the HF model is never loaded, dtype and device resolve as the HF engine's."""
    from hired_batch.engine import weights

    def no_hf_model(*a, **k):
        raise AssertionError("--engine vllm loaded the HF model")

    monkeypatch.setattr(weights, "load_llava", no_hf_model)
    out = tmp_path / "vllm.json"
    rc = cli.main(
        [
            "bench",
            "--engine",
            "vllm",
            "--model",
            str(vllm_next),
            "--quick",
            "--items",
            "2",
            "--selectors",
            "hired:0.2",
            "--workloads",
            "short",
            "--warmup",
            "0",
            "--peak-tflops",
            "1",
            "--mem-bw-gbs",
            "10",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    [row] = json.loads(out.read_text())["rows"]
    assert (row["engine"], row["selector"], row["workload"], row["items"]) == ("vllm", "hired", "short", 2)
    assert row["generated_tokens_min"] == row["generated_tokens_max"] == 8 and row["visual_tokens_per_item"] > 0
