"""Generation backends: a local transformers causal LM (GGUF de-quantised), or an OpenAI-compatible endpoint.

Each takes a :class:`GenerationSettings` (its own settings, not a command's config) and turns prompts into texts,
in input order.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib import error as urlerror
from urllib import request

from rir_finetune.errors import UserError


@dataclass
class GenerationSettings:
    model: str | None = (
        None  # local causal LM folder (or a .gguf file); with api_base: the model name to request
    )
    gguf_file: str | None = None  # GGUF file inside the 'model' folder (transformers dequantises it)
    system_prompt: str | None = None  # optional system message for chat models
    use_chat_template: bool = True  # use the tokenizer's chat template when it has one
    max_new_tokens: int = 300  # output length limit in tokens
    temperature: float = 0.0  # 0 = greedy decoding; > 0 samples
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 42  # sampling seed (only matters when temperature > 0)
    device: str | None = None  # cpu, cuda, cuda:1 ...; None: cuda when available
    api_base: str | None = (
        None  # OpenAI-compatible endpoint, e.g. http://localhost:8000/v1; None: local model
    )
    api_key: str | None = field(default_factory=lambda: os.getenv("OPENAI_API_KEY"))  # bearer token
    api_timeout: float = 300.0  # seconds per request


class Generator(Protocol):
    name: str

    def generate(self, prompts: list[str]) -> list[str]: ...


def _model_location(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder, gguf file name) for ``from_pretrained``; a path to a .gguf file is split into both."""
    path = Path(model)
    if gguf_file is None and path.suffix.lower() == ".gguf":
        return str(path.parent), path.name
    if not path.is_dir():
        raise UserError(f"{model}: model folder not found (give a local folder with --model)")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise UserError(f"{path / gguf_file}: GGUF file not found")
    return str(path), gguf_file


class LocalGenerator:
    """Batched generation with a transformers causal LM: left padding, chat template when there is one."""

    def __init__(self, cfg: GenerationSettings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        folder, gguf = _model_location(cfg.model or "", cfg.gguf_file)
        extra = {"gguf_file": gguf} if gguf else {}
        self.name = gguf or Path(folder).name
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        self.tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise UserError(f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(folder, **extra).to(self.device).eval()
        self.use_chat = cfg.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self.system_prompt = cfg.system_prompt
        eos = self.model.generation_config.eos_token_id
        sample = cfg.temperature > 0
        self.generation_config = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos if eos is not None else self.tokenizer.eos_token_id,
        )
        torch.manual_seed(cfg.seed)

    def _format(self, prompt: str) -> str:
        if not self.use_chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        texts = [self._format(p) for p in prompts]
        # a chat template already writes the special tokens it needs
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=self.generation_config)
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # (batch, generated length)
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class ApiGenerator:
    """An OpenAI-compatible ``/chat/completions`` endpoint, one request per prompt, a batch in parallel."""

    def __init__(self, cfg: GenerationSettings):
        if not cfg.model:
            raise UserError("config key 'model' is required: with api_base it names the model to request")
        self.name = cfg.model
        self.cfg = cfg
        self.url = cfg.api_base.rstrip("/") + "/chat/completions"

    def _one(self, prompt: str) -> str:
        cfg = self.cfg
        messages = [{"role": "user", "content": prompt}]
        if cfg.system_prompt:
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        body = {
            "model": cfg.model,
            "messages": messages,
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
        }
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        req = request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with request.urlopen(req, timeout=cfg.api_timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"] or "").strip()
        except urlerror.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
            raise UserError(f"{self.url}: HTTP {e.code} {e.reason}: {detail}") from None
        except (urlerror.URLError, OSError) as e:
            raise UserError(f"{self.url}: {getattr(e, 'reason', None) or e}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{self.url}: the reply is not an OpenAI chat completion") from None

    def generate(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            return list(pool.map(self._one, prompts))


def load_generator(cfg: GenerationSettings) -> Generator:
    if not cfg.model:
        raise UserError(
            "config key 'model' is required (a local causal LM folder, or a model name with api_base)"
        )
    return ApiGenerator(cfg) if cfg.api_base else LocalGenerator(cfg)
