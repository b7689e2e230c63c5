"""training/dropout.py: the keep mask's rate, scale, independence and replay; the Dropout module in the backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rir_finetune.training.dropout import Dropout, keep_mask, use_fast_dropout
from rir_finetune.training.model import BiEncoder


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_mask_rate_scale_independence_and_replay(p):
    torch.manual_seed(0)
    keep, scale = keep_mask((64, 12, 64, 64), p)
    t = round(p * 65536)
    rate = 1 - t / 65536
    n = keep.numel()
    sigma = (rate * (1 - rate) / n) ** 0.5
    assert abs(keep.float().mean().item() - rate) < 5 * sigma
    assert abs(rate * scale - 1) < 1e-12  # the expectation of the dropped output is the input
    lanes = keep.flatten().view(-1, 4).float().mean(0)  # the four 16-bit slices of each random word
    assert (lanes - rate).abs().max().item() < 5 * sigma * 2  # no slice biased (e.g. a word's sign bit)
    x = keep.flatten().float()
    assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()) < 0.01
    torch.manual_seed(0)
    assert torch.equal(keep_mask((64, 12, 64, 64), p)[0], keep)  # the generator's state replays it


def test_keep_mask_edges():
    keep, scale = keep_mask((4, 5), 0.0)
    assert keep.all() and scale == 1.0
    keep, scale = keep_mask((4, 5), 1.0)
    assert not keep.any() and scale == 0.0
    keep, _ = keep_mask((3, 7), 0.1)  # numel not a multiple of 4
    assert keep.shape == (3, 7) and keep.dtype == torch.bool


def test_dropout_module_equals_the_mask_times_the_scale_and_keeps_only_a_bool_mask():
    x = torch.randn(8, 16, 32, requires_grad=True)
    drop = Dropout(0.1).train()
    torch.manual_seed(4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    torch.manual_seed(4)
    keep, scale = keep_mask((8, 16, 32), 0.1)
    torch.testing.assert_close(y, x * keep * scale)
    assert [t.dtype for t in saved if t.numel() == x.numel()] == [torch.bool]
    y.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() * scale)
    assert torch.equal(drop.eval()(x), x)


def test_backbone_dropouts_are_replaced_and_the_saved_model_is_unchanged(tiny_bert_dir, tmp_path):
    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=True)
    drops = [m for m in model.backbone.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout for m in drops)  # embeddings, attention outputs, FFN outputs
    assert {m.p for m in drops} == {0.1}
    plain = BiEncoder.from_pretrained(
        str(tiny_bert_dir), pooling="mean", normalize=True, attn_implementation="sdpa"
    )
    assert not any(type(m) is Dropout for m in plain.backbone.modules())  # only the "auto" choice swaps them
    assert use_fast_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2), Dropout(0.3))) == 1
