"""``--engine vllm`` refused before Ray where vLLM could not run the checkpoint."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support.cli import run_before_ray

from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.engine.vllm.options import CPU_HEAD_SIZES


def test_our_copy_of_the_cpu_head_sizes_is_vllms():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == CPU_HEAD_SIZES


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for vLLM on CPU; this machine has a GPU")
def test_a_head_size_vllms_cpu_attention_cannot_run_is_refused_before_ray(capsys, tmp_path):
    from hired_batch.engine.tiny import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path / "tiny", "llava_next")  # head size 64 / 4 = 16
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(pa.table({"id": ["a"], "image": [img], "question": ["q"]}), tmp_path / "in.parquet")
    code, err = run_before_ray(
        capsys,
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(model),
        "--engine",
        "vllm",
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "head size is 16, which vLLM's CPU attention cannot run" in err
