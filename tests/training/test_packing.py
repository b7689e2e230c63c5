"""Packed sequences (``pack_sequences``, retrieval/packing.py) equal the padded path: embeddings and gradients, every pooling, fp32 tightly
and bf16 loosely, on the tiny BERT and the real all-MiniLM-L6-v2; backbones that cannot take them stay padded."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from rir_finetune.retrieval import packing
from rir_finetune.training.model import BiEncoder, load_tokenizer

TEXTS = ["cell protein gene", "the blood of mice with high insulin levels in the liver of old men and women",
         "virus", "heart risk in women", "sleep and exercise decrease the glucose level of patients"]  # fmt: skip


def _features(folder, texts=TEXTS, width=None):
    tok = load_tokenizer(str(folder))
    kw = {"padding": "max_length", "max_length": width} if width else {"padding": True}
    return dict(tok(texts, truncation=True, return_tensors="pt", **kw))


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _embed_and_grads(model, feats, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reps = model(features=feats)  # (n, D)
    # a loss that weighs every text and dimension differently, so each embedding's gradient matters
    weights = torch.linspace(-1, 1, reps.numel()).view_as(reps)
    (reps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return reps.detach(), grads


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
@pytest.mark.parametrize("which", ["tiny_bert_dir", "minilm_dir"])
def test_packed_equals_padded_embeddings_and_gradients(request, which, pooling, bf16):
    folder = request.getfixturevalue(which)
    feats = _features(folder, width=32)  # extra padding columns beyond the longest text: more to skip
    padded = _no_dropout(BiEncoder.from_pretrained(str(folder), pooling=pooling, normalize=True)).train()
    padded.pack_sequences = False
    packed = copy.deepcopy(padded)
    packed.pack_sequences = True
    calls = []
    real = packing.packed_hidden
    packing_spy = lambda *a, **k: (calls.append(1), real(*a, **k))[1]  # noqa: E731
    ref, ref_grads = _embed_and_grads(padded, feats, bf16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "packed_hidden", packing_spy)
        got, got_grads = _embed_and_grads(packed, feats, bf16)
    assert calls and packed._packing.ok  # the packed path ran
    tol = {"atol": 2e-2, "rtol": 2e-2} if bf16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(got, ref, **tol)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) > 10
    largest = max(g.abs().max() for g in ref_grads.values())
    for name, g in ref_grads.items():
        # relative to the tensor's largest gradient; a gradient that is zero in exact arithmetic (the key bias:
        # softmax ignores it) is rounding noise on both sides, measured against the model's largest gradient
        scale = max(g.abs().max(), 1e-3 * largest)
        limit = 5e-2 if bf16 else 1e-4
        assert (got_grads[name] - g).abs().max() <= limit * scale, name


def test_packing_skips_the_padding_tokens(tiny_bert_dir):
    feats = _features(tiny_bert_dir, width=32)
    p = packing.pack_features(feats)
    lengths = feats["attention_mask"].sum(1)
    assert p.inputs["input_ids"].shape == (1, int(lengths.sum())) < (1, 5 * 32)
    assert p.kwargs["cu_seq_lens_q"].tolist() == [0, *lengths.cumsum(0).tolist()]
    first = int(lengths[0])
    assert p.inputs["position_ids"][0, : first + 2].tolist() == [*range(first), 0, 1]  # restarting per text


def test_training_with_dropout_and_checkpointing_runs_packed(tiny_bert_dir):
    """Dropout on (the CPU keep-mask attention on the unpacked layout), activation checkpointing replaying the packed
    keywords: a step runs, and checkpointing equals no checkpointing with the same seed."""
    feats = _features(tiny_bert_dir)
    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=True).train()
    model.pack_sequences = True
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    torch.manual_seed(3)
    ref, ref_grads = _embed_and_grads(model, feats, False)
    torch.manual_seed(3)
    got, got_grads = _embed_and_grads(checkpointed, feats, False)
    torch.testing.assert_close(got, ref)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-6, rtol=1e-4)
    model.pack_sequences = False
    torch.manual_seed(3)
    padded, _ = _embed_and_grads(model, feats, False)
    assert not torch.allclose(padded, ref)  # dropout really drew masks (of another layout)


def test_an_attention_that_cannot_pack_stays_padded_with_one_line(tiny_bert_dir, caplog):
    caplog.set_level(logging.INFO, logger="rir_finetune")
    feats = _features(tiny_bert_dir)
    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=True,
                                      attn_implementation="eager").eval()  # fmt: skip
    ref = model.encode(feats)
    model.pack_sequences = True
    for _ in range(2):
        torch.testing.assert_close(model.encode(feats), ref, atol=0, rtol=0)
    assert not model._packing.ok
    lines = [r.getMessage() for r in caplog.records if "pack_sequences" in r.getMessage()]
    assert len(lines) == 1 and "'eager' takes no packed sequences" in lines[0]


def test_roberta_positions_start_after_the_padding_id(tmp_path):
    """RoBERTa's family numbers positions from pad_token_id + 1: found by the check, and packed equals padded."""
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "r")
    model = BiEncoder(packing_backbone(tmp_path / "r"), pooling="mean").eval()
    ids = torch.randint(3, 120, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    feats = {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}
    ref = model.encode(feats)
    model.pack_sequences = True
    got = model.encode(feats)
    assert model._packing.ok and model._packing.position_offset == 2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def packing_backbone(folder):
    from rir_finetune.training.model import load_backbone

    return load_backbone(str(folder), "auto")


def test_auto_packs_on_cuda_only():
    assert packing.pack_wanted("auto", torch.device("cuda", 0)) and not packing.pack_wanted(
        "auto", torch.device("cpu")
    )
    assert packing.pack_wanted(True, torch.device("cpu")) and not packing.pack_wanted(
        False, torch.device("cuda", 0)
    )


def test_gradient_cache_over_packed_chunks_equals_the_packed_chunked_step(tiny_bert_dir):
    """Dropout on: the cache's second pass replays the packed chunk's masks (the RNG restored), as padded."""
    from test_gradcache import CHUNK, _batch, _cfg, _plain_and_cached

    model = BiEncoder.from_pretrained(str(tiny_bert_dir), pooling="mean", normalize=False).train()
    model.pack_sequences = True
    batch = _batch(tiny_bert_dir)
    ref, plain, loss, cached = _plain_and_cached(model, batch, _cfg("retrieval_answer_passage", None), None)
    assert plain._packing.ok and cached._packing.ok and CHUNK < batch["passages"]["input_ids"].size(0)
    torch.testing.assert_close(loss, ref.loss.detach())
    for (name, p1), (_, p2) in zip(plain.named_parameters(), cached.named_parameters(), strict=True):
        if p1.grad is not None:
            assert (p2.grad - p1.grad).abs().max() <= 1e-5 * p1.grad.abs().max() + 1e-8, name


def test_sliding_window_layers_stay_padded(tmp_path):
    """ModernBERT's local layers get their window from the mask builder, which a packed forward bypasses: refused by
    the config (a probe of short texts, all inside the window, would pass), so texts longer than the window keep the
    padded path's embeddings."""
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=128, local_attention=8, pad_token_id=0,
                           global_attn_every_n_layers=3)  # fmt: skip
    torch.manual_seed(0)
    ModernBertModel(cfg).save_pretrained(tmp_path / "m")
    model = BiEncoder(packing_backbone(tmp_path / "m"), pooling="mean").eval()
    ids = torch.randint(3, 120, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    feats = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    ref = model.encode(feats)
    model.pack_sequences = True
    torch.testing.assert_close(model.encode(feats), ref, atol=0, rtol=0)
    assert not model._packing.ok and "sliding-window" in model._packing.reason
