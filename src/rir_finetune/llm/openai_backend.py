"""The ``openai`` backend: any OpenAI-compatible server (``vllm serve``, SGLang, ``python -m llama_cpp.server``,
hosted APIs) through the maintained ``openai`` client (``pip install 'rir-finetune[openai]'``).

Chat prompts (and plain prompts while ``use_chat_template`` is on) go to ``/chat/completions``, where the server
applies the model's chat template; plain prompts with ``use_chat_template false`` go to ``/completions``. Up to
``api_concurrency`` requests are in flight; the client retries 408/409/429/5xx answers, timeouts and refused
connections ``api_max_retries`` times with exponential backoff; every request has the ``api_timeout``. The key is
read from the environment variable ``api_key_env`` (unset: a placeholder, which local servers accept). Each of the
``n`` samples of a prompt is its own request with its own seed (:func:`~rir_finetune.llm.generation.sample_seed`),
which every server understands. Before any prompt is sent the server is asked for its model list, so an
unreachable server or a refused key is one line before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from rir_finetune.errors import UserError
from rir_finetune.llm.common import (
    BackendSettings,
    Completion,
    OnResult,
    Progress,
    Prompt,
    PromptTooLong,
    Sampling,
    messages_of,
    sample_seed,
)

INSTALL = "the openai backend needs the openai client: pip install 'rir-finetune[openai]'"
_CONTEXT_WORDS = ("context", "too long", "maximum", "exceed")


class OpenAIBackend:
    def __init__(self, settings: BackendSettings):
        try:
            import openai
        except ImportError:
            raise UserError(INSTALL) from None
        if not settings.api_base:
            raise UserError(
                "config key 'api_base' is required with --backend openai (e.g. http://localhost:8000/v1)"
            )
        if not settings.model:
            raise UserError(
                "config key 'model' is required: with --backend openai it names the model to request"
            )
        self.openai = openai
        self.settings = settings
        self.name = settings.model
        self.base = settings.api_base.rstrip("/")
        extra = settings.api_extra_body
        try:
            self.extra_body = json.loads(extra) if extra else None
        except json.JSONDecodeError as e:
            raise UserError(f"config key 'api_extra_body': not JSON ({e.msg})") from None
        if self.extra_body is not None and not isinstance(self.extra_body, dict):
            raise UserError("config key 'api_extra_body': must be a JSON object")
        key = os.environ.get(settings.api_key_env) or "no-key"
        self.client = openai.OpenAI(
            base_url=self.base,
            api_key=key,
            timeout=settings.api_timeout,
            max_retries=settings.api_max_retries,
        )
        try:  # reachable, and the key accepted, before any prompt is sent
            self.client.with_options(max_retries=0, timeout=min(settings.api_timeout, 30.0)).models.list()
        except openai.NotFoundError:
            pass  # a server without /models still serves completions
        except openai.OpenAIError as e:
            raise self._error(e) from None

    def _error(self, e: Exception, index: int | None = None) -> UserError:
        openai = self.openai
        env = self.settings.api_key_env
        if isinstance(e, openai.APITimeoutError):
            return UserError(f"{self.base}: no answer within {self.settings.api_timeout:g} s (api_timeout)")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            return UserError(
                f"{self.base}: cannot reach the server ({cause}); is it running at that address?"
            )
        if isinstance(e, openai.AuthenticationError):
            have = "is set" if os.environ.get(env) else "is not set"
            return UserError(
                f"{self.base}: HTTP 401: the server refused the key (the environment variable {env} {have})"
            )
        if isinstance(e, openai.APIStatusError):
            detail = " ".join(str(getattr(e, "message", "") or e).split())[:300]
            if (
                index is not None
                and e.status_code in (400, 413, 422)
                and any(w in detail.lower() for w in _CONTEXT_WORDS)
            ):
                return PromptTooLong(
                    index, f"prompt {index + 1} is too long for the server's context: {detail}"
                )
            return UserError(f"{self.base}: HTTP {e.status_code}: {detail}")
        return UserError(f"{self.base}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

    # -- one request ---------------------------------------------------------------------------------------------

    def _one(self, prompt: Prompt, sampling: Sampling, seed: int) -> Completion:
        s = self.settings
        common = {
            "model": s.model,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
            "n": 1,
        }
        if self.extra_body:
            common["extra_body"] = self.extra_body
        if isinstance(prompt, str) and not s.use_chat_template:
            if sampling.logprobs:
                common["logprobs"] = 1
            reply = self.client.completions.create(prompt=prompt, **common)
            choice = reply.choices[0]
            text = choice.text or ""
            lps = list(choice.logprobs.token_logprobs) if sampling.logprobs and choice.logprobs else None
        else:
            if sampling.logprobs:
                common["logprobs"] = True
            reply = self.client.chat.completions.create(
                messages=messages_of(prompt, s.system_prompt), **common
            )
            choice = reply.choices[0]
            text = choice.message.content or ""
            lps = (
                [t.logprob for t in choice.logprobs.content]
                if sampling.logprobs and choice.logprobs and choice.logprobs.content
                else None
            )
        tokens = reply.usage.completion_tokens if reply.usage is not None else len(lps or [])
        finish = "length" if choice.finish_reason == "length" else "stop"
        return Completion(text=text, tokens=int(tokens), finish_reason=finish, token_logprobs=lps)

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, on_result: OnResult | None = None
    ) -> list[list[Completion]]:
        for p in prompts:
            messages_of(p, None)  # a malformed prompt fails before any request
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        missing = [sampling.n] * len(prompts)
        progress = Progress(len(prompts), self.settings.progress, on_result)
        jobs = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        pool = ThreadPoolExecutor(max_workers=min(self.settings.api_concurrency, max(len(jobs), 1)))
        futures: dict[Future, tuple[int, int]] = {}
        try:
            it = iter(jobs)
            limit = 2 * self.settings.api_concurrency  # submitted but unfinished, so a failure stops early

            def submit_more() -> None:
                while len(futures) < limit:
                    job = next(it, None)
                    if job is None:
                        return
                    i, j = job
                    seed = sample_seed(sampling.seed, prompts[i], j)
                    futures[pool.submit(self._one, prompts[i], sampling, seed)] = job

            submit_more()
            while futures:
                done, _ = wait(list(futures), return_when=FIRST_EXCEPTION)
                for f in done:
                    i, j = futures.pop(f)
                    try:
                        results[i][j] = f.result()
                    except self.openai.OpenAIError as e:
                        raise self._error(e, i) from None
                    missing[i] -= 1
                    if missing[i] == 0:
                        progress.done(i, results[i])  # type: ignore[arg-type]
                submit_more()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            progress.close()
        self.last_counts = progress.counts
        return results  # type: ignore[return-value]

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        raise UserError(
            "the openai backend does not score continuations (servers differ in prompt log-probabilities); "
            "use --backend transformers or --backend llama_cpp for a query-likelihood teacher"
        )
