"""engine/dims.py: the one bytes-per-parameter rule every size estimate reads."""

import pytest
import torch

from hired_batch.config import ConfigError
from hired_batch.engine.dims import bytes_per_param


@pytest.mark.parametrize(
    "dtype, size",
    [("float32", 4), ("bfloat16", 2), ("float16", 2), (torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)],
)
def test_bytes_per_param_of_names_and_torch_dtypes(dtype, size):
    assert bytes_per_param(dtype) == size
    if isinstance(dtype, torch.dtype):
        assert size == torch.finfo(dtype).bits // 8  # the rule the bench used to write itself


def test_unknown_dtype_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="auto.*bfloat16"):
        bytes_per_param("auto")
