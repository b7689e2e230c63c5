"""training/attention.py: rir_sdpa is exact attention (dropout included) with a lean backward; the model uses it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rir_finetune.training.attention import ATTENTION, additive_mask, attention_core, attention_forward
from rir_finetune.training.dropout import keep_mask
from rir_finetune.training.model import BiEncoder


class _Module(torch.nn.Module):
    is_causal = False  # an encoder's attention module (transformers' SDPA function reads this)


def _qkv(b=3, h=2, lq=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, lq, d, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(b, 1, lq, lq, dtype=torch.bool)
    mask[0, ..., 3:] = False  # padding of the first row's last two tokens
    return q, k, v, mask


def _reference(q, k, v, mask, keep, scale):
    """Eager attention as transformers' eager_attention_forward computes it, with a given dropout mask and scale."""
    s = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5 + additive_mask(mask, q.dtype)
    w = torch.softmax(s, dim=-1) * keep * scale
    return torch.matmul(w, v).transpose(1, 2)


def test_training_with_dropout_equals_eager_with_the_same_mask_and_gradients():
    q, k, v, mask = _qkv()
    module = _Module().train()
    torch.manual_seed(3)
    out, _ = attention_forward(module, q, k, v, mask, dropout=0.3)
    torch.manual_seed(3)
    keep, scale = keep_mask((3, 2, 5, 5), 0.3)  # the draw attention_forward makes
    assert 0 < keep.float().mean() < 1
    assert scale == 65536 / (65536 - 19661)  # round(0.3 * 65536) = 19661
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = _reference(q2, k2, v2, mask, keep, scale)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    out.backward(go)
    ref.backward(go)
    for a, b in ((q, q2), (k, k2), (v, v2)):  # the recomputed backward equals the eager one
        torch.testing.assert_close(a.grad, b.grad)


def test_bf16_attention_is_close_to_fp32_with_the_same_mask():
    q, k, v, mask = _qkv(b=2, h=2, lq=16, d=8)
    torch.manual_seed(1)
    out, _ = attention_forward(_Module().train(), *(t.bfloat16() for t in (q, k, v)), mask, dropout=0.1)
    torch.manual_seed(1)
    keep, scale = keep_mask((2, 2, 16, 16), 0.1)
    ref = _reference(q, k, v, mask, keep, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    go = torch.randn_like(ref)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(1)
    attention_forward(_Module().train(), qb, kb, vb, mask, dropout=0.1)[0].backward(go.bfloat16())
    ref.backward(go)
    for a, b in ((qb, q), (kb, k), (vb, v)):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


def test_backward_keeps_only_inputs_and_a_bool_mask():
    q, k, v, mask = _qkv(b=2, h=2, lq=64, d=8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attention_forward(_Module().train(), q, k, v, mask, dropout=0.1)
    big = [
        t for t in saved if t.numel() >= 2 * 2 * 64 * 64
    ]  # (B, H, L, L)-sized tensors kept for the backward
    assert big and all(
        t.dtype == torch.bool for t in big
    )  # the keep mask only, no fp32 scores or probabilities


def test_no_dropout_or_eval_is_sdpa():
    q, k, v, mask = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    for module in (_Module().eval(), _Module().train()):  # the model passes dropout 0 in evaluation
        out, _ = attention_forward(module, q, k, v, mask, dropout=0.0)
        torch.testing.assert_close(out, expected)


def test_attention_core_no_grad_equals_checkpointed():
    q, k, v, mask = _qkv()
    keep = torch.rand(3, 2, 5, 5) > 0.2
    with torch.no_grad():
        a = attention_core(q, k, v, additive_mask(mask, q.dtype), keep, 0.5, 1.25)
    torch.testing.assert_close(
        a,
        torch.matmul(
            torch.softmax(q @ k.transpose(-1, -2) * 0.5 + additive_mask(mask, q.dtype), -1) * keep, v * 1.25
        ),
    )


def test_bi_encoder_uses_it_and_the_saved_model_does_not(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=True)
    assert model.backbone.config._attn_implementation == ATTENTION
    plain = BiEncoder.from_pretrained(
        str(tiny_bert_dir), pooling="mean", normalize=True, attn_implementation="eager"
    )
    assert plain.backbone.config._attn_implementation == "eager"
    model.backbone.save_pretrained(tmp_path)
    assert not any("attn" in k for k in json.loads((tmp_path / "config.json").read_text()))
    assert AutoModel.from_pretrained(tmp_path).config._attn_implementation != ATTENTION
    # in evaluation the two give the same embeddings
    feats = {"input_ids": torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])}  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(features=feats), plain.eval()(features=feats), atol=1e-6, rtol=1e-5
        )


@pytest.mark.gpu
def test_cuda_training_uses_sdpa_kernels():
    q, k, v, mask = (t.cuda() if t is not None else None for t in _qkv())
    out, _ = attention_forward(_Module().train(), q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, dropout=0.1)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 2, 4)
