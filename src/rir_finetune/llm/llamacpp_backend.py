"""The ``llama_cpp`` backend: llama-cpp-python on a GGUF file (``pip install 'rir-finetune[llamacpp]'``).

llama.cpp runs the quantised weights as they are (no de-quantisation), on every core, with the layers offloaded
to the GPU when the library was built with CUDA or Metal (``device cpu`` keeps them on the CPU). Up to
``batch_size`` sequences decode together: each llama.cpp batch holds one new token for every live sequence plus the
prompts of the sequences that start in it; when a sequence ends its slot takes the next prompt (continuous
batching, longest prompts first), every sequence in its own KV stream.

Prompts are built as ``python -m llama_cpp.server`` builds them (the GGUF's chat template, rendered by
llama-cpp-python's Jinja formatter; plain prompts tokenised with the model's BOS), and greedy is the plain argmax,
so with ``batch_size 1`` the answers equal the server's (with its ``repeat_penalty`` set to 1). Sampling draws with
one numpy generator per prompt and sample (temperature, then top-p), seeded by
:func:`~rir_finetune.llm.generation.sample_seed`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rir_finetune.errors import UserError
from rir_finetune.llm.common import (
    BackendSettings,
    Completion,
    OnResult,
    Progress,
    Prompt,
    PromptTooLong,
    Sampling,
    ScoreProgress,
    check_gguf,
    messages_of,
    model_file,
    order_by_length,
    sample_seed,
    threads_setting,
)

INSTALL = "the llama_cpp backend needs llama-cpp-python: pip install 'rir-finetune[llamacpp]' (it compiles llama.cpp)"


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


def extra_buffers_wanted() -> bool:
    """Whether llama.cpp may repack weights into its CPU "extra" buffer types (AMX tiles, interleaved Q4_0).

    ``RIR_FINETUNE_LLAMA_EXTRA_BUFFERS=on|off`` decides; by default they are off on CPUs with AMX: there
    llama-cpp-python 0.3.36 built from source (native) segfaults in ``llama_decode`` on any batch of more than a
    few tokens (seen on a Sapphire Rapids VM: Q4_1, Q4_0 and Q8_0, batch 1 and 16; fine with them off).
    """
    value = os.environ.get("RIR_FINETUNE_LLAMA_EXTRA_BUFFERS", "auto").lower()
    if value in ("on", "1", "true"):
        return True
    if value in ("off", "0", "false"):
        return False
    if value != "auto":
        raise UserError(f"RIR_FINETUNE_LLAMA_EXTRA_BUFFERS={value!r}: use on, off or auto")
    return not cpu_has_amx()


@contextmanager
def _model_params(**fields):
    """Llama() takes no option for some model parameters: set them on the defaults it starts from."""
    import llama_cpp.llama as high

    orig = high.llama_cpp.llama_model_default_params

    def patched():
        params = orig()
        for k, v in fields.items():
            if hasattr(params, k):
                setattr(params, k, v)
        return params

    high.llama_cpp.llama_model_default_params = patched
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = orig


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(INSTALL) from None
    return llama_cpp


def gguf_cache_dir() -> Path:
    """Where re-quantised GGUF files go: ``$RIR_FINETUNE_CACHE/gguf``, else ``~/.cache/rir_finetune/gguf``."""
    if os.environ.get("RIR_FINETUNE_CACHE"):
        return Path(os.environ["RIR_FINETUNE_CACHE"]) / "gguf"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rir_finetune" / "gguf"


def requantized(lc, path: Path, kind: str, threads: int) -> Path:
    """``path`` re-quantised to ``kind`` (q4_0, q8_0, f16), made once and cached; the source is only read.

    Why: llama.cpp's CPU backend has repacked / tinyBLAS matrix kernels for Q4_0, Q8_0 and F16 but not for every
    type (Q4_1, Q5_x), and without them a step of B sequences costs about B single steps. Re-quantising changes
    the weights slightly (from Q4_1: Q8_0 keeps them within rounding, Q4_0 rounds them again), so greedy answers
    can differ from the source file's; the file name holds the source's identity (path, size, mtime).
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = gguf_cache_dir() / f"{path.stem}.{key}.{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = {"q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "f16": lc.LLAMA_FTYPE_MOSTLY_F16}[kind]  # fmt: skip
    params.allow_requantize = True
    params.nthread = threads
    start = time.perf_counter()
    try:
        import ctypes

        rc = lc.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise UserError(f"{path}: llama.cpp could not re-quantise it to {kind} (code {rc})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"{path.name}: re-quantised to {kind} in {time.perf_counter() - start:.1f} s (gguf_requantize), "
        f"cached at {out}",
        file=sys.stderr,
    )
    return out


@dataclass
class _Seq:
    row: int  # index into the rows list
    tokens: list[int]  # the prompt
    rng: np.random.Generator | None
    pos: int = 0  # next position to write
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "length"


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    m = float(logits.max())
    return float(logits[token] - m - np.log(np.exp(logits - m).sum()))


class LlamaCppBackend:
    def __init__(self, settings: BackendSettings):
        self.settings = settings
        folder, gguf = model_file(settings.model, settings.gguf_file)
        if gguf is None:
            raise UserError(
                f"{folder}: the llama_cpp backend reads a GGUF file: give --model FILE.gguf or --gguf_file NAME"
            )
        path = folder / gguf
        check_gguf(path)
        lc = _import_llama_cpp()
        self.lc = lc
        self.name = gguf
        self.threads = threads_setting(settings.n_threads)
        if settings.gguf_requantize:
            path = requantized(lc, path, settings.gguf_requantize, self.threads)
        offload = settings.device != "cpu" and lc.llama_supports_gpu_offload()
        self.gpu = bool(offload)
        extra = extra_buffers_wanted()
        try:
            with _model_params(use_extra_bufts=extra):
                self.llm = self._load(lc, path, offload)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{path}: llama.cpp cannot load this model ({e})") from None
        self.extra_buffers = extra
        self.model = self.llm._model.model  # the llama_model pointer for the C API
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = min(settings.n_ctx, lc.llama_model_n_ctx_train(self.model))
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.use_chat = bool(settings.use_chat_template and template)
        self.formatter = None
        if self.use_chat:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        self._ctx = None
        self._ctx_shape: tuple[int, int, int, bool] | None = None

    def _load(self, lc, path: Path, offload: bool):
        return lc.Llama(
            model_path=str(path),
            n_ctx=256,  # this context is not used for decoding (ours below is): keep it small
            n_batch=256,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            n_gpu_layers=-1 if offload else 0,
            verbose=False,
        )

    # -- prompts -------------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str) and not self.use_chat:
            return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        if self.formatter is None:
            raise UserError(
                f"{self.name}: chat messages need a chat template, and this GGUF has none "
                "(or use_chat_template is off); send a plain prompt"
            )
        text = self.formatter(messages=messages_of(prompt, self.settings.system_prompt)).prompt
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _check_lengths(self, ids: list[list[int]], new: int) -> None:
        for i, t in enumerate(ids):
            if len(t) + new > self.n_ctx:
                raise PromptTooLong(
                    i,
                    f"prompt {i + 1} is {len(t)} tokens: with max_new_tokens={new} it does not fit the context of "
                    f"{self.n_ctx} tokens ({self.name}); raise n_ctx, shorten it or lower max_new_tokens",
                )

    # -- the llama.cpp context -----------------------------------------------------------------------------------

    def _context(self, n_seq: int, per_seq: int, n_batch: int, many_outputs: bool = False):
        """A context with ``n_seq`` KV streams of ``per_seq`` cells (reused while it is large enough)."""
        lc = self.lc
        per_seq = -(-per_seq // 256) * 256
        shape = (n_seq, per_seq, n_batch, many_outputs)
        if self._ctx is not None and self._ctx_shape == shape:
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
            return self._ctx
        self._free_context()
        params = lc.llama_context_default_params()
        params.n_ctx = n_seq * per_seq
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_seq
        params.kv_unified = False  # one KV stream per sequence: its attention sees only its own cells
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.server (flash_attn off)
        if many_outputs:
            params.n_outputs_max_per_seq = n_batch
        ctx = lc.llama_init_from_model(self.model, params)
        if ctx is None:
            raise UserError(
                f"{self.name}: llama.cpp could not create a context of {n_seq} x {per_seq} tokens "
                "(out of memory?); lower batch_size or n_ctx"
            )
        self._ctx, self._ctx_shape = ctx, shape
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        return ctx

    def _free_context(self) -> None:
        if self._ctx is not None:
            self.lc.llama_batch_free(self._batch)
            self.lc.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        self.llm.close()

    def __del__(self):
        try:
            self._free_context()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def _logits(self, ctx, i: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, on_result: OnResult | None = None
    ) -> list[list[Completion]]:
        lc = self.lc
        ids = [self.prompt_ids(p) for p in prompts]
        self._check_lengths(ids, sampling.max_new_tokens)
        rows = [(i, j) for i in order_by_length([len(t) for t in ids]) for j in range(sampling.n)]
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        missing = [sampling.n] * len(prompts)
        progress = Progress(len(prompts), self.settings.progress, on_result)
        if not rows:
            progress.close()
            return []
        n_seq = min(self.settings.batch_size, len(rows))
        longest = max(len(t) for t in ids)
        n_batch = max(512, longest + n_seq)
        ctx = self._context(n_seq, longest + sampling.max_new_tokens, n_batch)
        mem = lc.llama_get_memory(ctx)
        batch = self._batch
        queue = list(range(len(rows)))[::-1]  # pop() takes the next (longest) row
        free = list(range(n_seq))[::-1]
        live: dict[int, _Seq] = {}
        pending: dict[int, int] = {}  # seq id -> token to feed next
        try:
            while queue or live:
                n = 0
                outputs: list[int] = []  # seq ids whose logits come out of this batch, in batch order
                for s, tok in pending.items():
                    seq = live[s]
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, seq.pos, 1
                    batch.seq_id[n][0], batch.logits[n] = s, True
                    seq.pos += 1
                    n += 1
                    outputs.append(s)
                pending.clear()
                while queue and free and n + len(ids[rows[queue[-1]][0]]) <= n_batch:
                    r = queue.pop()
                    s = free.pop()
                    i, j = rows[r]
                    rng = (
                        None
                        if sampling.greedy
                        else np.random.default_rng(sample_seed(sampling.seed, prompts[i], j))
                    )
                    seq = live[s] = _Seq(row=r, tokens=ids[i], rng=rng)
                    for k, tok in enumerate(seq.tokens):
                        batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, k, 1
                        batch.seq_id[n][0], batch.logits[n] = s, k == len(seq.tokens) - 1
                        n += 1
                    seq.pos = len(seq.tokens)
                    outputs.append(s)
                batch.n_tokens = n
                rc = lc.llama_decode(ctx, batch)
                if rc != 0:
                    raise UserError(
                        f"{self.name}: llama_decode failed (code {rc}); lower batch_size or n_ctx"
                    )
                # logits of output k are at batch index: the k-th position with logits set
                positions = [p for p in range(n) if batch.logits[p]]
                for s, p in zip(outputs, positions, strict=True):
                    seq = live[s]
                    logits = self._logits(ctx, p)
                    tok = self._pick(logits, sampling, seq.rng)
                    if lc.llama_vocab_is_eog(self.vocab, tok):
                        seq.finish = "stop"
                        done = True
                    else:
                        seq.out.append(tok)
                        if sampling.logprobs:
                            seq.logprobs.append(_log_softmax_at(logits, tok))
                        done = len(seq.out) >= sampling.max_new_tokens
                    if not done:
                        pending[s] = tok
                        continue
                    del live[s]
                    lc.llama_memory_seq_rm(mem, s, -1, -1)
                    free.append(s)
                    i, j = rows[seq.row]
                    results[i][j] = Completion(
                        text=self.llm.detokenize(seq.out, prev_tokens=seq.tokens).decode(
                            "utf-8", errors="ignore"
                        ),
                        tokens=len(seq.out),
                        finish_reason=seq.finish,
                        token_logprobs=seq.logprobs if sampling.logprobs else None,
                    )
                    missing[i] -= 1
                    if missing[i] == 0:
                        progress.done(i, results[i])  # type: ignore[arg-type]
        finally:
            progress.close()
        self.last_counts = progress.counts
        return results  # type: ignore[return-value]

    @staticmethod
    def _pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
        if rng is None:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / sampling.temperature
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        if sampling.top_p < 1:
            order = np.argsort(-p, kind="stable")
            sp = p[order]
            keep = (np.cumsum(sp) - sp) <= sampling.top_p
            q = np.zeros_like(p)
            q[order[keep]] = sp[keep]
            p = q / q.sum()
        return int(rng.choice(len(p), p=p))

    # -- scoring -------------------------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation after its plain-text prompt (no chat template)."""
        lc = self.lc
        if len(prompts) != len(continuations):
            raise UserError(f"score: {len(prompts)} prompts but {len(continuations)} continuations")
        pairs = []
        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            head = list(self.llm.tokenize(p.encode("utf-8"), add_bos=True, special=False))
            tail = list(self.llm.tokenize(c.encode("utf-8"), add_bos=False, special=False))
            if len(head) + len(tail) > self.n_ctx:
                raise PromptTooLong(i, f"prompt {i + 1} and its continuation do not fit {self.n_ctx} tokens")
            if not head:
                raise UserError(f"score: prompt {i + 1} is empty")
            pairs.append((head, tail))
        out: list[list[float]] = [[] for _ in pairs]
        if not pairs:
            return out
        longest = max(len(h) + len(t) for h, t in pairs)
        n_batch = max(512, longest)
        ctx = self._context(1, longest, n_batch, many_outputs=True)
        mem = lc.llama_get_memory(ctx)
        batch = self._batch
        bar = ScoreProgress(len(pairs), self.settings.progress)
        for i, (head, tail) in enumerate(pairs):
            seq = head + tail
            bar.update(1, len(seq))
            for k, tok in enumerate(seq):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, k, 1
                batch.seq_id[k][0], batch.logits[k] = 0, k >= len(head) - 1 and k < len(seq) - 1
            batch.n_tokens = len(seq)
            if not tail:
                continue
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise UserError(f"{self.name}: llama_decode failed (code {rc}) while scoring")
            for k, tok in enumerate(tail):
                out[i].append(_log_softmax_at(self._logits(ctx, len(head) - 1 + k), tok))
            lc.llama_memory_seq_rm(mem, 0, -1, -1)
        bar.close()
        return out
