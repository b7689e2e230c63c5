"""The ``transformers`` backend: a Hugging Face causal LM (a folder, or a GGUF file de-quantised).

The model computes in ``dtype`` (``auto``: bf16 where the device has native bf16, :mod:`rir_finetune.precision`;
the tokens/s of each are in benchmarks/README.md). bf16 and fp32 greedy answers differ, as two models' would.

Prompts are tokenised once and sorted by length (longest first), then decoded ``batch_size`` at a time: left
padding with position ids from the mask, a KV cache, and rows that finish (end of sequence or ``max_new_tokens``)
leave the batch at once, so a batch costs what its live rows cost. Greedy is argmax; sampling draws every row
with its own generator (:func:`~rir_finetune.llm.generation.sample_seed`), so a sample does not depend on its
batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from rir_finetune import precision
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
    torch_threads,
)

logger = logging.getLogger("rir_finetune")


@contextlib.contextmanager
def _quiet_gguf_dtype_advice():
    """Drop transformers' advice to load a GGUF in float32 "because its weights stay packed": it is printed before
    transformers finds that no GGUF kernel is available offline and de-quantises the whole model anyway (and bf16
    then decodes faster than fp32 where it is native), so for this backend it is wrong."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "weights packed is fastest in float32" not in record.getMessage()

    log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


# share of the free CUDA memory a batch may fill: the allocator rounds blocks up, and the decode step's temporaries
# (logits, sampling) come on top of the estimate
GENERATION_MEMORY_SHARE = 0.8


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of the KV cache per token: keys and values of every layer's key-value heads."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def row_bytes(config, dtype_bytes: int, prompt_tokens: int, new_tokens: int, logits_kept: int = 1) -> float:
    """Memory one row of a batch needs: its KV cache over prompt + new tokens, the prefill's largest layer
    temporaries per prompt token (hidden states, the MLP's two intermediate products) and the causal mask, and the
    fp32 logits (with their log-softmax) at the kept positions."""
    text = getattr(config, "text_config", None) or config
    h, inter = text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    kv = kv_bytes_per_token(config, dtype_bytes) * (prompt_tokens + new_tokens)
    prefill = dtype_bytes * (4 * h + 2 * inter) * prompt_tokens + prompt_tokens * (prompt_tokens + new_tokens)
    logits = logits_kept * text.vocab_size * (dtype_bytes + 8)
    return float(kv + prefill + logits)


def rows_that_fit(
    free_bytes: float, per_row: float, rows_left: int, share: float = GENERATION_MEMORY_SHARE
) -> int:
    """How many rows of ``per_row`` bytes fit ``share`` of ``free_bytes``: at least 1, at most ``rows_left``."""
    return max(1, min(rows_left, int(share * free_bytes // max(per_row, 1.0))))


class TransformersBackend:
    def __init__(self, settings: BackendSettings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        folder, gguf = model_file(settings.model, settings.gguf_file)
        from rir_finetune.llm.causal_lm import check_causal_lm

        check_causal_lm(folder, gguf)
        if gguf:
            import importlib.util

            check_gguf(folder / gguf)

            if importlib.util.find_spec("gguf") is None:
                raise UserError(
                    "reading a GGUF file with --backend transformers needs the gguf package: "
                    "pip install 'rir-finetune[gguf]' (or use --backend llama_cpp)"
                )
        extra = {"gguf_file": gguf} if gguf else {}
        self.name = gguf or Path(folder).name
        from rir_finetune.llm.common import threads_setting
        from rir_finetune.precision import resolve_device

        # fewer threads on busy cores (threads_setting), for this backend's own work only: torch_threads restores the
        # process's count after each call
        self.threads = threads_setting(settings.n_threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
            self.device = resolve_device(settings.device)
            self.dtype = settings.resolved_dtype()
            with torch_threads(self.threads), _quiet_gguf_dtype_advice():
                self.model = (
                    AutoModelForCausalLM.from_pretrained(
                        str(folder), dtype=getattr(torch, self.dtype), **extra
                    )
                    .to(self.device)
                    .eval()
                )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{folder}{'/' + gguf if gguf else ''}: cannot load a causal LM ({first})"
            ) from None
        self.tokenizer.padding_side = "left"
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise UserError(f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token")
        self.pad_id = pad
        self._narrow_logits = True  # score(): continuation positions only (_continuation_logits)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.use_chat = settings.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        positions = getattr(self.model.config, "max_position_embeddings", None) or settings.n_ctx
        self.n_ctx = min(settings.n_ctx, positions)
        self._logged_rows = False

    # -- batch size ----------------------------------------------------------------------------------------------

    def _rows(self, longest: int, new_tokens: int, logits_kept: int, configured: int, left: int) -> int:
        """Rows per batch: the configured count on a CPU; on CUDA as many as the free memory holds (:func:`row_bytes`,
        :func:`rows_that_fit`); the first size is logged."""
        import torch

        if torch.device(self.device).type != "cuda":
            return configured
        free = precision.cuda_free_bytes(self.device)
        per_row = row_bytes(
            self.model.config, getattr(torch, self.dtype).itemsize, longest, new_tokens, logits_kept
        )
        rows = rows_that_fit(free, per_row, left)
        if not self._logged_rows:
            self._logged_rows = True
            logger.info(
                "%s: batches of up to %d rows on %s (%.1f GiB free, %.1f MiB per row of %d + %d tokens)",
                self.name, rows, self.device, free / 2**30, per_row / 2**20, longest, new_tokens,
            )  # fmt: skip
        return rows

    # -- prompts -------------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids: through the chat template when it has one (and it is on), else plain text."""
        if isinstance(prompt, str) and not self.use_chat:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not self.use_chat:
            raise UserError(
                f"{self.name}: chat messages need a chat template, and this model has none "
                "(or use_chat_template is off); send a plain prompt"
            )
        text = self.tokenizer.apply_chat_template(
            messages_of(prompt, self.settings.system_prompt), tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # the template wrote them

    def _tokenize_all(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[int]]:
        ids = [self.prompt_ids(p) for p in prompts]
        for i, t in enumerate(ids):
            if len(t) + sampling.max_new_tokens > self.n_ctx:
                raise PromptTooLong(
                    i,
                    f"prompt {i + 1} is {len(t)} tokens: with max_new_tokens={sampling.max_new_tokens} it does not "
                    f"fit the context of {self.n_ctx} tokens ({self.name}); shorten it or lower max_new_tokens",
                )
        return ids

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, on_result: OnResult | None = None
    ) -> list[list[Completion]]:
        with torch_threads(self.threads):
            return self._generate(prompts, sampling, on_result)

    def _generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, on_result: OnResult | None = None
    ) -> list[list[Completion]]:
        ids = self._tokenize_all(prompts, sampling)
        rows = [(i, j) for i in order_by_length([len(t) for t in ids]) for j in range(sampling.n)]
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        missing = [sampling.n] * len(prompts)
        progress = Progress(len(prompts), self.settings.progress, on_result)
        try:
            step = self.settings.batch_size * sampling.n if sampling.n > 1 else self.settings.batch_size
            lo = 0  # longest prompts first: on CUDA each batch as large as its longest row allows
            while lo < len(rows):
                size = self._rows(len(ids[rows[lo][0]]), sampling.max_new_tokens, 1, step, len(rows) - lo)
                batch, lo = rows[lo : lo + size], lo + size
                seeds = [sample_seed(sampling.seed, prompts[i], j) for i, j in batch]
                for (i, j), completion in zip(
                    batch, self._decode([ids[i] for i, _ in batch], seeds, sampling), strict=True
                ):
                    results[i][j] = completion
                    missing[i] -= 1
                    if missing[i] == 0:
                        progress.done(i, results[i])  # type: ignore[arg-type]
        finally:
            progress.close()
        self.last_counts = progress.counts
        return results  # type: ignore[return-value]

    def _decode(self, ids: list[list[int]], seeds: list[int], sampling: Sampling) -> list[Completion]:
        import torch
        from transformers import DynamicCache

        n = len(ids)
        width = max(len(t) for t in ids)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, t in enumerate(ids):
            input_ids[r, width - len(t) :] = torch.tensor(t, dtype=torch.long)
            mask[r, width - len(t) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = None
        if not sampling.greedy:
            gens = []
            for s in seeds:
                g = torch.Generator(device=self.device)  # multinomial draws on the device the logits are on
                g.manual_seed(s)
                gens.append(g)
        dev = self.device
        input_ids, mask, positions = input_ids.to(dev), mask.to(dev), positions.to(dev)
        cache = DynamicCache(config=self.model.config)
        live = list(range(n))  # original row of each live row
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            last_pos = positions[:, -1]
            for _ in range(sampling.max_new_tokens):
                logits = out.logits[:, -1, :].float()
                picked = self._pick(logits, sampling, [gens[r] for r in live] if gens else None)
                lp = (
                    torch.log_softmax(logits, dim=-1).gather(1, picked[:, None])[:, 0]
                    if sampling.logprobs
                    else None
                )
                keep = []
                picked_list = picked.tolist()
                for k, r in enumerate(live):
                    tok = picked_list[k]
                    if tok in self.eos_ids:
                        finish[r] = "stop"
                        continue
                    tokens[r].append(tok)
                    if lp is not None:
                        logps[r].append(float(lp[k]))
                    if len(tokens[r]) < sampling.max_new_tokens:
                        keep.append(k)
                if not keep:
                    break
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(index)
                    mask, last_pos, picked = mask[index], last_pos[index], picked[index]
                    live = [live[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                last_pos = last_pos + 1
                out = self.model(
                    input_ids=picked[:, None],
                    attention_mask=mask,
                    position_ids=last_pos[:, None],
                    cache=cache,
                    use_cache=True,
                )
        return [
            Completion(
                text=self.tokenizer.decode(tokens[r], skip_special_tokens=True),
                tokens=len(tokens[r]),
                finish_reason=finish[r],
                token_logprobs=logps[r] if sampling.logprobs else None,
            )
            for r in range(n)
        ]

    @staticmethod
    def _pick(logits, sampling: Sampling, gens):
        import torch

        if gens is None:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > sampling.top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        picks = [int(torch.multinomial(probs[k], 1, generator=g)) for k, g in enumerate(gens)]
        return torch.tensor(picks, device=logits.device)

    # -- scoring -------------------------------------------------------------------------------------------------

    def _continuation_logits(self, ids, mask, positions):
        """Logits at ``positions`` (batch, K) only: the vocabulary projection of every position (a fifth of a
        135M model's compute, and a batch x width x vocab float tensor) is what scoring a continuation does not
        need. Models whose forward does not take a 2-D ``logits_to_keep`` get the full logits, gathered here."""
        import torch

        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        if self._narrow_logits:
            try:
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
                if tuple(logits.shape[:2]) == tuple(positions.shape):
                    return logits
            except (TypeError, ValueError, IndexError, RuntimeError):
                pass
            self._narrow_logits = False  # this model cannot: full logits from now on
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return torch.take_along_dim(logits, positions[..., None], dim=1)

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation after its plain-text prompt (no chat template)."""
        with torch_threads(self.threads):
            return self._score(prompts, continuations)

    def _score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        import torch

        if len(prompts) != len(continuations):
            raise UserError(f"score: {len(prompts)} prompts but {len(continuations)} continuations")
        pairs = []
        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            head = list(self.tokenizer(p, add_special_tokens=True)["input_ids"])
            tail = list(self.tokenizer(c, add_special_tokens=False)["input_ids"])
            if len(head) + len(tail) > self.n_ctx:
                raise PromptTooLong(i, f"prompt {i + 1} and its continuation do not fit {self.n_ctx} tokens")
            pairs.append((head, tail))
        out: list[list[float]] = [[] for _ in pairs]
        order = order_by_length([len(h) + len(t) for h, t in pairs])
        bar = ScoreProgress(len(pairs), self.settings.progress)
        most_tail = max((len(t) for _, t in pairs), default=1)
        lo = 0
        while lo < len(order):  # longest first
            longest = len(pairs[order[lo]][0]) + len(pairs[order[lo]][1])
            kept = max(most_tail, 1) if self._narrow_logits else longest  # logits per row
            size = self._rows(longest, 0, kept, self.settings.batch_size, len(order) - lo)
            chunk, lo = order[lo : lo + size], lo + size
            seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(seqs):  # right padding: positions are the plain 0..len-1
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            # the logits that predict each continuation token: positions len(head)-1 .. len(head)+len(tail)-2
            # of each row, padded to the longest tail by repeating a row's last one
            wanted = [[len(pairs[i][0]) + k - 1 for k in range(len(pairs[i][1]))] or [0] for i in chunk]
            keep = max(len(w) for w in wanted)
            positions = torch.tensor([w + w[-1:] * (keep - len(w)) for w in wanted], dtype=torch.long)
            with torch.inference_mode():
                logits = self._continuation_logits(ids, mask, positions)
            # each continuation token's log-probability picked where the logits are: only (rows, K) leave the device
            tails = torch.tensor(
                [t + [0] * (keep - len(t)) for t in (pairs[i][1] for i in chunk)], dtype=torch.long
            )
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, tails.to(logp.device)[..., None]).squeeze(-1).cpu()  # (rows, K)
            for r, i in enumerate(chunk):
                out[i] = picked[r, : len(pairs[i][1])].tolist()
            bar.update(len(chunk), sum(len(s) for s in seqs))
        bar.close()
        return out
