"""``gradient_cache: auto``: the plain step when the batch fits the device, the gradient cache only when it does not.

The gradient cache bounds memory by encoding part of the batch twice; where the whole batch fits, that second pass is
pure loss (on a GPU it dominated the step). So ``auto`` estimates the plain step's
activation memory from the model config and the batch's shapes, and compares it with the device's budget:

- estimate: what autograd keeps for the backward, per token and layer (:func:`bytes_per_token`, checked against the
  bytes autograd really saves in ``tests/training/test_memory_plan.py``), times the batch's tokens at the maximum
  lengths (the collator pads to the longest text, at most the maximum), times :data:`PEAK_FACTOR` for what the
  step holds beyond the kept activations (the backward's temporaries, the allocator's free blocks);
- budget: free CUDA memory (``torch.cuda.mem_get_info`` plus what torch's caching allocator holds unused), or
  :data:`CPU_SHARE` of the host's available RAM, less the weights, gradients and optimizer state;
- under the cache, a chunk holds as many texts as fit half the budget, and the graphs kept from the first pass
  (``gradient_cache_memory_mb``) get the other half.

:func:`decide` is the pure rule (numbers in, plan out); :func:`resolve_gradient_cache` gathers the numbers for a run
and writes the plan into the run's keys, with one log line saying which mode and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("rir_finetune")

# the step's peak over the activations autograd keeps. CPU: the heap keeps freed blocks for reuse (cpu_memory.py)
# and the backward recomputes attention scores: the plain step's resident peak was a few times the kept activations
# (benchmarks/README.md, "gradient_cache: auto"). CUDA: the caching allocator reuses blocks; the backward's gradients
# of one layer at a time come on top.
PEAK_FACTOR = {"cuda": 1.5, "cpu": 3.0}
# half of the host's available RAM: the data-loader workers (a tokenizer and the dataset each), the round's later
# stages in the same process and whatever else runs on the host need the rest, and an estimate that is off by a
# third must still not swap
CPU_SHARE = 0.5
# torch's own context and the allocator's rounding take a little of what mem_get_info reports
CUDA_SHARE = 0.9
STATE_BYTES_PER_PARAM = 18  # fp32 weights and gradients, AdamW's two moments, a 16-bit copy under autocast


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    attention_dropout: float = 0.0
    params: int = 0

    @classmethod
    def of(cls, config, params: int = 0) -> ModelShape:
        hidden = int(
            getattr(config, "hidden_size", None)
            or getattr(config, "n_embd", 0)
            or getattr(config, "d_model", 0)
        )
        layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 1)
        heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0) or 1)
        inter = int(
            getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        )
        drop = getattr(config, "attention_probs_dropout_prob", None)
        drop = getattr(config, "attention_dropout", 0.0) if drop is None else drop
        return cls(hidden, inter, heads, layers, float(drop or 0.0), params)


def bytes_per_token(
    shape: ModelShape, seq_len: int, elem_bytes: int, attention: str, checkpointing: bool = False
) -> float:
    """Bytes autograd keeps for the backward per token of a text of ``seq_len`` tokens (all layers).

    Per layer: the inputs of the q/k/v, output and two FFN matrices, q, k and v, the GELU input (``elem_bytes``
    each: 4 in fp32, 2 under bf16/fp16 autocast, where linear layers keep 16-bit copies), the two LayerNorm inputs
    (fp32 under autocast too) and the two 1-byte hidden-dropout masks; the attention adds ``attention``'s share:
    ``kernel`` (fused SDPA: a log-sum-exp per head), ``keep_mask`` (``rir_sdpa`` on a CPU with dropout: a 1-byte keep
    mask per score, scores recomputed in the backward), ``math`` (scores, probabilities and dropped probabilities
    kept, plus the mask). With activation checkpointing a layer keeps its fp32 input only, and one layer at a time
    holds everything.
    """
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    scores = {"kernel": 4 * a, "keep_mask": a * seq_len, "math": a * seq_len * (3 * elem_bytes + 1)}[
        attention
    ]
    layer = elem_bytes * (8 * h + 2 * i) + 10 * h + 16 + scores
    if checkpointing:
        return 4 * h * shape.layers + layer
    return layer * shape.layers + 5 * h  # + the embeddings' LayerNorm input and dropout mask


@dataclass(frozen=True)
class Part:
    texts: int
    max_len: int


def batch_parts(
    batch: int, group: int, query_len: int, passage_len: int, answer_len: int, answers: bool, candidates: bool
) -> list[Part]:
    """The tokenised parts of one step on one device (:class:`rir_finetune.training.collator.Batch`)."""
    parts = [Part(batch, query_len), Part(batch * group, passage_len)]
    if candidates:
        parts.append(Part(batch * group, answer_len))  # each query's answer leads its candidates
    elif answers:
        parts.append(Part(batch, answer_len))
    return parts


def weight_copies(shape: ModelShape, elem_bytes: int) -> float:
    """Bytes of the 16-bit copies of the layers' matrices that autocast makes (and the backward keeps) per forward."""
    h, i = shape.hidden, shape.intermediate
    return float(shape.layers * (4 * h * h + 2 * h * i) * 2) if elem_bytes == 2 else 0.0


def activation_estimate(
    shape: ModelShape, parts: list[Part], elem_bytes: int, attention: str, checkpointing: bool = False
) -> tuple[float, float]:
    """(bytes the plain step keeps for the whole batch, the most one text keeps) at the parts' maximum lengths."""
    total, per_text = 0.0, 0.0
    for p in parts:
        text = bytes_per_token(shape, p.max_len, elem_bytes, attention, checkpointing) * p.max_len
        total += text * p.texts + weight_copies(shape, elem_bytes)  # one forward per part
        per_text = max(per_text, text)
    return total, per_text


# `gradient_cache: true` without sizes: the bounded-memory mode as it shipped (the main job's epoch at 2.2-2.3 GiB on a
# CPU in bf16, benchmarks/README.md); sizing from the budget would use the memory a user forcing the cache keeps free
FORCED_CHUNK, FORCED_KEEP_MB = 16, 1024


@dataclass(frozen=True)
class CachePlan:
    gradient_cache: bool
    chunk_size: int
    keep_bytes: int
    reason: str


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if abs(x) >= 2**30 else f"{x / 2**20:.1f} MiB"


def decide(
    activations: float,
    per_text: float,
    budget: float,
    peak_factor: float,
    max_texts: int,
    forced: bool | None = None,
    chunk_size: int | None = None,
    memory_mb: int | None = None,
) -> CachePlan:
    """The gradient-cache plan from given numbers (bytes): plain when ``activations * peak_factor`` fits ``budget``
    (or ``forced`` False), else the cache: graphs kept from the first pass up to half the budget (``memory_mb``
    when set), chunks of as many texts as fit the rest (``chunk_size`` when set; at least 1, at most
    ``max_texts``). ``forced`` True asks for a small footprint whatever the device holds: unless set, chunks of
    :data:`FORCED_CHUNK` texts and :data:`FORCED_KEEP_MB` kept."""
    if forced is not None or budget <= 0:
        # forced, or nothing left to size from: fixed sizes. A forced plain step records them too, so that a resumed
        # run's keys equal the first run's whatever memory is free at the time
        chunk_size = chunk_size or FORCED_CHUNK
        memory_mb = FORCED_KEEP_MB if memory_mb is None else memory_mb
    peak = activations * peak_factor
    # at least 1 MiB kept: the resolved config records whole megabytes (``gradient_cache_memory_mb`` >= 1)
    keep = (memory_mb << 20) if memory_mb is not None else max(1 << 20, int(budget / 2 / peak_factor))
    room = budget - keep * peak_factor
    chunk = chunk_size or int(min(max(room // max(per_text * peak_factor, 1.0), 1), max(max_texts, 1)))
    fit = f"estimated peak {_gib(peak)} ({_gib(activations)} of activations x {peak_factor:g})"
    if forced is False:
        return CachePlan(False, chunk, keep, f"gradient_cache false: the plain step ({fit})")
    if forced is None and peak <= budget:
        return CachePlan(
            False,
            chunk,
            keep,
            f"gradient_cache auto -> the plain step: {fit} fits the budget of {_gib(budget)}",
        )
    if forced:
        why = "gradient_cache true"
    elif budget <= 0:
        why = (f"gradient_cache auto -> the cache: the weights and optimizer state alone leave no budget "
               f"({_gib(budget)}); the fixed sizes of gradient_cache true")  # fmt: skip
    else:
        why = f"gradient_cache auto -> the cache: {fit} exceeds the budget of {_gib(budget)}"
    return CachePlan(True, chunk, keep, f"{why}; chunks of {chunk} texts, graphs kept up to {_gib(keep)}")


# -- the numbers of a run ----------------------------------------------------------------------------------------

FALLBACK_CHUNK, FALLBACK_KEEP_MB = FORCED_CHUNK, FORCED_KEEP_MB  # the model config unreadable (refused later)


def available_ram() -> float:
    """Bytes the kernel could give this process without swapping (``MemAvailable``), else the free pages."""
    import os

    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_budget(device) -> tuple[float, str]:
    """(bytes a training step may use on ``device``, how that was found)."""
    if device.type == "cuda":
        from rir_finetune.precision import cuda_free_bytes

        free = cuda_free_bytes(device)
        return CUDA_SHARE * free, f"{CUDA_SHARE:g} x {_gib(free)} free on {device}"
    avail = available_ram()
    return CPU_SHARE * avail, f"{CPU_SHARE:g} x {_gib(avail)} of available RAM"


def count_params(config, trust_remote_code: bool = False) -> int:
    """Parameters of the architecture, built on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModel

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 (an architecture that cannot be built here: the usual transformer count)
        s = ModelShape.of(config)
        return 12 * s.hidden * s.hidden * s.layers + int(getattr(config, "vocab_size", 0)) * s.hidden


def _attention_kind(shape: ModelShape, device_type: str, attn_implementation: str | None) -> str:
    if attn_implementation == "eager":  # the (L, L) scores and probabilities kept, on any device
        return "math"
    if device_type == "cuda" or shape.attention_dropout == 0:
        return "kernel"
    return "keep_mask" if attn_implementation in ("auto", "rir_sdpa") else "math"


def _recorded(train_args) -> dict:
    """The resolved config of the run a resumed run continues (empty for a new run)."""
    import yaml

    from rir_finetune import lifecycle

    if not train_args.resume_from_checkpoint:
        return {}
    try:
        path = Path(train_args.output_dir) / lifecycle.RESOLVED_CONFIG
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def plan_for_run(model_args, data_args, obj_args, train_args) -> CachePlan:
    """The plan for a run's keys: a resumed run keeps its recorded choice (the same steps as uninterrupted)."""
    forced = model_args.gradient_cache if isinstance(model_args.gradient_cache, bool) else None
    chunk, mem = model_args.gradient_cache_chunk_size, model_args.gradient_cache_memory_mb
    old = _recorded(train_args)
    if forced is None and isinstance(old.get("gradient_cache"), bool):
        chunk = chunk or old.get("gradient_cache_chunk_size") or FALLBACK_CHUNK
        mem = old.get("gradient_cache_memory_mb") if mem is None else mem
        mem = FALLBACK_KEEP_MB if mem is None else mem
        return CachePlan(old["gradient_cache"], chunk, mem << 20,
                         f"gradient_cache {str(old['gradient_cache']).lower()}: as the resumed run chose")  # fmt: skip
    if forced is None and train_args.deepspeed:
        return CachePlan(False, chunk or FALLBACK_CHUNK, (mem or 0) << 20,
                         "gradient_cache auto -> the plain step: DeepSpeed takes no gradient cache")  # fmt: skip
    from transformers import AutoConfig

    hf = {"trust_remote_code": model_args.trust_remote_code, "cache_dir": model_args.cache_dir,
          "token": model_args.token}  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, **hf)
    except (OSError, ValueError, TypeError):
        keep = FALLBACK_KEEP_MB if mem is None else mem
        return CachePlan(bool(forced), chunk or FALLBACK_CHUNK, keep << 20, "model config unreadable")
    params = count_params(config, model_args.trust_remote_code)
    shape = ModelShape.of(config, params)
    device = train_args.device
    half = train_args.bf16 or train_args.fp16
    parts = batch_parts(
        train_args.per_device_train_batch_size, data_args.train_group_size, data_args.query_max_len,
        data_args.passage_max_len, data_args.answer_max_len, obj_args.uses_answers, data_args.answer_inbatch,
    )  # fmt: skip
    attention = _attention_kind(shape, device.type, model_args.attn_implementation)
    activations, per_text = activation_estimate(
        shape, parts, 2 if half else 4, attention, bool(train_args.gradient_checkpointing)
    )
    budget, where = device_budget(device)
    # LoRA: the frozen weights only (4 bytes each; the adapters' gradients and moments are a rounding error)
    state = params * (4 if model_args.use_lora else STATE_BYTES_PER_PARAM)
    budget = _least_across_ranks(budget - state)
    plan = decide(activations, per_text, budget, PEAK_FACTOR.get(device.type, PEAK_FACTOR["cuda"]),
                  max(p.texts for p in parts), forced, chunk, mem)  # fmt: skip
    budget_text = (
        f"{where}, less {_gib(state)} for {params / 1e6:.1f}M parameters' weights and optimizer state"
    )
    return CachePlan(
        plan.gradient_cache, plan.chunk_size, plan.keep_bytes, f"{plan.reason}; budget: {budget_text}"
    )


def _least_across_ranks(budget: float) -> float:
    """Every rank takes the same decision: the smallest budget of any rank."""
    import torch

    from rir_finetune.training import distributed

    if not distributed.is_distributed():
        return budget
    t = torch.tensor([budget], dtype=torch.float64, device=distributed._comm_device())
    return float(distributed.gather_no_grad(t).min())


def resolve_gradient_cache(model_args, data_args, obj_args, train_args) -> CachePlan:
    """Write the plan into the run's keys (``gradient_cache`` a bool, the chunk and the kept megabytes numbers), so
    the resolved config records what ran; one log line says which mode and why."""
    plan = plan_for_run(model_args, data_args, obj_args, train_args)
    model_args.gradient_cache = plan.gradient_cache
    model_args.gradient_cache_chunk_size = plan.chunk_size
    model_args.gradient_cache_memory_mb = plan.keep_bytes >> 20
    logger.info("%s", plan.reason)
    return plan
