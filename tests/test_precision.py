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


def test_device_auto_is_the_local_ranks_gpu_else_the_cpu(monkeypatch):
    import torch

    from rir_finetune.precision import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        resolve_device("auto") == "cpu" and resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == "cuda:3"  # under torchrun each rank takes its own GPU
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == "cuda:0"


@pytest.mark.parametrize("command", ["eval", "mine", "score", "generate", "reward", "augment"])
def test_every_model_command_defaults_to_device_auto_and_says_so_in_help(command, capsys):
    from rir_finetune.cli import main

    main([command, "--help"])
    out = capsys.readouterr().out
    assert "device str (default 'auto')" in out, out


def test_device_cuda_without_a_gpu_is_one_line_exit_2(tmp_path, capsys):
    import torch

    from rir_finetune.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tmp_path), "--data", str(tmp_path), "--output_dir", str(tmp_path / "o"),
              "--device", "cuda"])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.strip()
        == "error: config key 'device': 'cuda' is not available (this machine has no CUDA GPU)"
    )


# The encoders' keys: dtype auto (bf16 on CUDA, fp32 on a CPU) and pack_sequences auto, in every command that encodes
ENCODING_KEYS = {
    "eval": ("device", "dtype", "pack_sequences"),
    "mine": ("device", "dtype", "pack_sequences"),
    "score": ("device", "dtype", "pack_sequences"),
    "reward": ("retriever_device", "retriever_dtype", "retriever_pack_sequences"),
    "generate": ("consistency_device", "consistency_dtype", "consistency_pack_sequences"),
}


@pytest.mark.parametrize("command", sorted(ENCODING_KEYS))
def test_every_encoding_command_lists_its_encoder_keys_defaulting_to_auto(command, capsys):
    from rir_finetune.cli import main

    main([command, "--help"])
    out = capsys.readouterr().out
    device, dtype, pack = ENCODING_KEYS[command]
    assert f"{device} str (default 'auto')" in out and f"{dtype} str (default 'auto')" in out, out
    assert f"{pack} bool | str (default 'auto')" in out, out


@pytest.mark.parametrize(
    ("cuda", "cuda_bf16", "cpu_bf16", "device", "expected"),
    [
        (False, False, True, None, "float32"),  # a CPU with native bf16: encoding stays fp32 unless asked
        (False, False, False, "cpu", "float32"),
        (True, True, True, None, "bfloat16"),  # auto device = the GPU
        (True, True, True, "cpu", "float32"),  # a GPU machine encoding on its CPU
        (True, False, True, "cuda:0", "float32"),  # a GPU without bf16 (V100, T4)
    ],
)
def test_encode_dtype_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_on_a_cpu(
    monkeypatch, cuda, cuda_bf16, cpu_bf16, device, expected
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": cpu_bf16})
    assert precision.resolve_encode_dtype("auto", device) == expected
    assert precision.resolve_encode_dtype("bf16", device) == "bfloat16"
    assert precision.resolve_encode_dtype("fp32", device) == "float32"


@pytest.mark.parametrize(
    ("command", "key"),
    [("eval", "pack_sequences"), ("mine", "pack_sequences"), ("score", "pack_sequences"),
     ("reward", "retriever_pack_sequences"), ("generate", "consistency_pack_sequences"),
     ("mine", "dtype"), ("reward", "retriever_dtype"), ("generate", "consistency_dtype"), ("score", "dtype"),
     ("eval", "dtype")],
)  # fmt: skip
def test_a_bad_encoder_key_is_one_line_naming_it(command, key, tmp_path, capsys):
    from rir_finetune.cli import main

    required = {
        "eval": ["--model", str(tmp_path), "--data", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    }
    with pytest.raises(SystemExit) as e:
        main([command, *required.get(command, []), f"--{key}", "sometimes"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and f"config key '{key}'" in err and "sometimes" in err, err
