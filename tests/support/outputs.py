"""Reading what a job left behind: committed checkpoint ids and the output's rows."""

from __future__ import annotations

import os

import pyarrow.parquet as pq


def committed_checkpoint_ids(ckpt) -> list[str]:
    """Ids in Ray's committed checkpoint files (pending ones end in .pending.parquet)."""
    names = (
        [f for f in os.listdir(ckpt) if f.endswith(".parquet") and not f.endswith(".pending.parquet")]
        if os.path.isdir(ckpt)
        else []
    )
    return [i for f in names for i in pq.read_table(os.path.join(ckpt, f)).column("id").to_pylist()]


def check_every_row_once(table, ids: list[str]) -> None:
    """Every input id exactly once; each row either answered or errored, never both."""
    got = table.column("id").to_pylist()
    dupes = sorted({i for i in got if got.count(i) > 1})
    assert not dupes, f"rows written twice: {dupes}"
    assert sorted(got) == sorted(ids), f"missing {sorted(set(ids) - set(got))}, extra {sorted(set(got) - set(ids))}"
    both = [
        r["id"]
        for r in table.select(["id", "answer", "error"]).to_pylist()
        if (r["answer"] is None) == (r["error"] is None)
    ]
    assert not both, f"rows both answered and errored, or neither: {both}"
