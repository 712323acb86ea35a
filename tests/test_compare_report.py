"""The engine comparison's results (``hired_batch.bench.compare_report``): ratios between
rows, the table and the plot, on rows made by hand (no engine runs)."""

import pytest

from hired_batch.bench.compare_report import add_ratios, plot_figure, table


def _compare_row(workload, engine, selector, items_per_s, ideal_items_per_s):
    return dict(
        workload=workload,
        engine=engine,
        selector=selector,
        budget=1.0 if selector == "full" else 0.2,
        label=f"{engine} {selector}",
        batch_size=4,
        items=16,
        repeats=2,
        max_new_tokens=8,
        items_per_s=items_per_s,
        items_per_s_best=items_per_s * 1.1,
        items_per_s_worst=items_per_s * 0.9,
        visual_tokens_per_item=2349 if selector == "full" else 490,
        generated_tokens_per_item=8.0,
        generated_tokens_min=8,
        generated_tokens_max=8,
        decoded_tokens_per_item=8.0,
        output_tokens_per_s=8 * items_per_s,
        ttft_s=1.0,
        ideal_items_per_s=ideal_items_per_s,
        cpu_stall_share=0.01,
        speedup=None,
        ideal_speedup=None,
        vs_stock_vllm=None,
    )


def test_compare_ratios_table_and_plot():
    """speedup: over the same engine's full on the same workload; vs_stock_vllm: over stock
    vLLM full on the same workload; the plot has one panel per workload."""
    rows = [
        _compare_row(w, e, s, v * (2 if w == "long" else 1), i)
        for w in ("short", "long")
        for e, s, v, i in (
            ("vllm", "full", 0.1, 1.0),
            ("vllm", "hired:0.2", 0.35, 4.0),
            ("hf", "full", 0.2, 1.0),
            ("hf", "hired:0.2", 0.8, 4.0),
        )
    ]
    add_ratios(rows)
    by = {(r["workload"], r["engine"], r["selector"]): r for r in rows}
    assert by["short", "vllm", "hired:0.2"]["speedup"] == pytest.approx(3.5)
    assert by["short", "hf", "hired:0.2"]["speedup"] == pytest.approx(4.0)
    assert by["long", "hf", "full"]["vs_stock_vllm"] == pytest.approx(2.0)
    assert all(r["ideal_speedup"] == pytest.approx(1.0 if r["selector"] == "full" else 4.0) for r in rows)
    text = table(rows)
    assert "| short | vllm hired:0.2 | 4 | 0.350 |" in text and "| 3.50 | 4.00 | 0.87 | 3.50 |" in text
    fig = plot_figure(rows, "title")
    assert [ax.get_title() for ax in fig.axes] == ["short answers (max 8 tokens)", "long answers (max 8 tokens)"]
