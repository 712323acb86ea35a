"""The --ask bench (bench/ask_bench.py) runs on the tiny model and reports both baselines."""

import re

from hired_batch.bench import ask_bench
from hired_batch.job.ask import parse_asks


def test_ask_bench_times_both_baselines_on_the_tiny_model(tiny_next, capsys):
    assert (
        ask_bench.main(
            [
                "--model",
                str(tiny_next),
                "--engine",
                "hf",
                "--selectors",
                "hired:0.2",
                "--ks",
                "1,2",
                "--images",
                "1",
                "--same",
            ]
        )
        == 0
    )
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| hf |")]
    assert [r.split("|")[3].strip() for r in rows] == ["1", "2"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        separate, asked, same = float(cells[3]), float(cells[4]), float(cells[8])
        assert separate > 0 and asked > 0 and same > 0
        assert re.fullmatch(r"-?\d+%", cells[9])  # the saving against same-image rows


def test_distinct_copies_differ_only_in_their_hash():
    import io

    from PIL import Image

    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

    png = image_to_bytes(make_synthetic_image(40, 30, 1))
    rows = ask_bench._separate([png], parse_asks(["a=A?", "b=B?", "c=C?"]), distinct=True)
    ims = list(rows["image"])
    assert ims[0] == png and len(set(ims)) == 3  # the first as given, the others another copy each
    sizes = {Image.open(io.BytesIO(b)).size for b in ims}
    assert sizes == {(40, 30)}
    same = ask_bench._separate([png], parse_asks(["a=A?", "b=B?"]), distinct=False)
    assert list(same["image"]) == [png, png] and list(same["question"]) == ["A?", "B?"]
