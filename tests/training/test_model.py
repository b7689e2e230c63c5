"""The encoder: pooling by hand, and chunked encoding / gradient checkpointing equal to the plain path."""

from __future__ import annotations

import pytest
import torch

from rir_finetune.training.arguments import ObjectiveArguments
from rir_finetune.training.model import BiEncoder, load_tokenizer, pool
from rir_finetune.training.objectives import compute_objectives

H = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [7.0, 8.0], [0.5, 0.5]]])  # (2, 3, 2)
M = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_pooling_by_hand():
    assert pool(H, M, "cls").tolist() == [[1.0, 2.0], [5.0, 6.0]]
    # mean over unmasked tokens: [(1+3)/2, (2+4)/2] and [(5+7+0.5)/3, (6+8+0.5)/3]
    torch.testing.assert_close(pool(H, M, "mean"), torch.tensor([[2.0, 3.0], [12.5 / 3, 14.5 / 3]]))
    # last non-padding token with right padding
    assert pool(H, M, "last_token").tolist() == [[3.0, 4.0], [0.5, 0.5]]
    # left padding: the last position
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(H, left, "last_token").tolist() == [[9.0, 9.0], [0.5, 0.5]]


def test_mean_pooling_of_half_precision_states_is_fp32_and_does_not_overflow():
    """1000 tokens of 100.0 in fp16: the fp16 sum (100000) is inf; the fp32 mean is exactly 100."""
    hidden = torch.full((2, 1000, 4), 100.0, dtype=torch.float16)
    mask = torch.ones(2, 1000, dtype=torch.long)
    mask[1, 500:] = 0
    assert not torch.isfinite((hidden * mask.unsqueeze(-1).half()).sum(dim=1)).all()  # what fp16 pooling did
    out = pool(hidden, mask, "mean")
    assert out.dtype == torch.float32
    assert out.tolist() == [[100.0] * 4, [100.0] * 4]


def _batch(tok):
    q = ["cell protein", "heart risk in women", "virus dose", "sleep and insulin level"]
    p = [f"{x} w{i} the tumor" for i, x in enumerate(q * 2)]
    enc = lambda t: dict(tok(t, padding=True, truncation=True, max_length=16, return_tensors="pt"))  # noqa: E731
    return enc(q), enc(p), enc([f"answer {x}" for x in q])


def _loss_and_grads(model, batch):
    q, p, a = batch
    model.zero_grad()
    reps = model(queries=q, passages=p, answers=a)
    cfg = ObjectiveArguments(training_type="retrieval_answer_passage", temperature=0.05)
    loss = compute_objectives(reps.q_reps, reps.p_reps, cfg, a_reps=reps.a_reps).loss
    loss.backward()
    grads = {n: prm.grad.clone() for n, prm in model.named_parameters() if prm.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("variant", ["sub_batch", "checkpointing"])
def test_chunking_and_checkpointing_match_plain(tiny_bert_dir, variant):
    tok = load_tokenizer(str(tiny_bert_dir))
    batch = _batch(tok)
    plain = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=True)
    plain.train()
    for m in plain.modules():  # dropout off: the two paths must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    if variant == "sub_batch":
        plain.sub_batch_size = 3
    else:
        plain.activation_checkpointing_enable()
        assert plain.is_activation_checkpointing
    loss, grads = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4)


def test_config_name_gives_the_architecture_settings(tiny_bert_dir, tmp_path):
    """Upstream's config_name: the config comes from that folder, the weights from model_name_or_path."""
    import json

    other = tmp_path / "cfg"
    other.mkdir()
    cfg = json.loads((tiny_bert_dir / "config.json").read_text())
    cfg["attention_probs_dropout_prob"] = 0.37
    (other / "config.json").write_text(json.dumps(cfg))
    plain = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="cls", normalize=True)
    model = BiEncoder.from_pretrained(
        str(tiny_bert_dir), pooling="cls", normalize=True, config_name=str(other)
    )
    assert model.backbone.config.attention_probs_dropout_prob == 0.37
    assert plain.backbone.config.attention_probs_dropout_prob != 0.37
    for (name, a), (_, b) in zip(
        plain.backbone.named_parameters(), model.backbone.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name  # the same weights
