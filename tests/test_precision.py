"""Which float type a run computes in: the dtype key, its aliases and ``auto``."""

from __future__ import annotations

import pytest

from rir_finetune import precision
from rir_finetune.errors import UserError
from rir_finetune.precision import check_dtype, cpu_has_bf16, resolve_dtype


@pytest.mark.parametrize(
    "value, name",
    [("auto", "auto"), ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("fp32", "float32"), ("float16", "float16"),
     ("half", "float16"), ("bfloat16", "bfloat16")],
)  # fmt: skip
def test_dtype_names_and_aliases(value, name):
    assert check_dtype(value) == name


def test_an_unknown_dtype_names_the_key():
    with pytest.raises(
        UserError, match=r"config key 'llm.dtype': 'fp8' is not one of auto, float32, bfloat16"
    ):
        check_dtype("fp8", "llm.dtype")


@pytest.mark.parametrize(
    "caps, native",
    [({"avx512_bf16": True, "avx2": True}, True), ({"amx_bf16": True}, True), ({"avx2": True, "avx512": True}, False),
     ({}, False), ({"avx512_bf16": False}, False)],
)  # fmt: skip
def test_cpu_bf16_is_native_only_with_the_bf16_extensions(caps, native):
    assert cpu_has_bf16(caps) is native


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_is_bf16_only_where_native(monkeypatch, native, expected):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native})
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("fp32", "cpu") == "float32" and resolve_dtype("bf16", "cpu") == "bfloat16"
    assert precision.bf16_native("cpu") is native
