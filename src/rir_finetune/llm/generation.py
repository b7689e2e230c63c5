"""The LLM backends behind one interface: prompts in, completions (text, token count, finish reason, log-probs) out.

    backend = load_backend(BackendSettings(backend="llama_cpp", model="SmolLM2-135M-Instruct.Q4_1.gguf"))
    replies = backend.generate(prompts, Sampling(max_new_tokens=128))  # one list of n completions per prompt

Backends (``BackendSettings.backend``):

- ``transformers`` (:mod:`.hf_backend`): any Hugging Face causal LM folder, a GGUF file de-quantised; prompts are
  length-sorted, decoded ``batch_size`` at a time with a KV cache and left padding; finished rows leave the batch.
- ``llama_cpp`` (:mod:`.llamacpp_backend`): llama-cpp-python on a GGUF file (quantised kernels; GPU offload when
  the library was built with CUDA/Metal); ``batch_size`` sequences decode together in one llama.cpp batch, a new
  prompt taking the place of each finished one (continuous batching).
- ``openai`` (:mod:`.openai_backend`): any OpenAI-compatible server (``vllm serve``, SGLang,
  ``python -m llama_cpp.server``, hosted APIs): ``concurrency`` requests in flight, retries with backoff on
  429/5xx/connection errors, a timeout per request, the key from the environment variable ``api_key_env``.

Guarantees shared by all three: outputs come back in input order whatever the batching; sampling is seeded per
prompt and sample (:func:`sample_seed`: the prompt text, the sample number and ``Sampling.seed``), so a resumed or
re-batched run draws the same samples; a prompt that does not fit the context is a :class:`PromptTooLong` (a
``UserError``) raised before anything is generated; a progress bar shows prompts and tokens/s.
"""

from __future__ import annotations

from rir_finetune.errors import UserError
from rir_finetune.llm.common import (
    BACKENDS,
    Backend,
    BackendSettings,
    Completion,
    Counts,
    OnResult,
    Progress,
    Prompt,
    PromptTooLong,
    Sampling,
    check_gguf,
    messages_of,
    model_file,
    order_by_length,
    sample_seed,
    threads_setting,
)

__all__ = [
    "BACKENDS", "Backend", "BackendSettings", "Completion", "Counts", "OnResult", "Progress", "Prompt",
    "PromptTooLong", "Sampling", "check_gguf", "load_backend", "messages_of", "model_file", "order_by_length",
    "sample_seed", "threads_setting",
]  # fmt: skip


def load_backend(settings: BackendSettings) -> Backend:
    """The backend ``settings.backend`` names, loaded (a local model is read now; a server is asked now)."""
    if not settings.model:
        raise UserError(
            "config key 'model' is required (a model folder, a .gguf file, or with --backend openai the model name)"
        )
    if settings.backend == "openai" or (settings.api_base and settings.backend == "transformers"):
        from rir_finetune.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(settings)
    if settings.backend == "llama_cpp":
        from rir_finetune.llm.llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(settings)
    from rir_finetune.llm.hf_backend import TransformersBackend

    return TransformersBackend(settings)
