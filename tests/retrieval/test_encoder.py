"""Model folders (plain transformers vs sentence-transformers) and the encoder built on them."""

import numpy as np
import pytest
import torch

from eval_fixtures import add_st_files, make_tiny_bert
from rir_finetune.errors import UserError
from rir_finetune.retrieval import encoder as encoder_module
from rir_finetune.retrieval.encoder import Encoder, batch_tokens, bytes_per_token, length_sorted_batches, pool
from rir_finetune.retrieval.model_folder import EncoderSettings, read_settings

TEXTS = ["apple", "the banana is a cherry of the apple", "cherry cherry", "a", "banana of apple"]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "plain")


@pytest.fixture(scope="module")
def st_cls_dir(tmp_path_factory):
    folder = make_tiny_bert(tmp_path_factory.mktemp("models") / "st_cls")
    return add_st_files(folder, pooling="cls", prompts={"query": "Q: ", "document": "D: "}, max_seq_length=8)


def test_settings_of_a_plain_folder(plain_dir):
    # sentence-transformers' guess for a bare folder: mean pooling, cosine similarity (= normalised);
    # the tokenizer's model_max_length is "unlimited" (1e30), so max_position_embeddings (512) applies
    assert read_settings(plain_dir) == EncoderSettings(str(plain_dir), "mean", True, 512, "", "")


def test_settings_of_a_sentence_transformers_folder(st_cls_dir, tmp_path):
    assert read_settings(st_cls_dir) == EncoderSettings(str(st_cls_dir), "cls", True, 8, "Q: ", "D: ")
    overridden = read_settings(
        st_cls_dir, pooling="mean", normalize=False, max_length=4, query_instruction=""
    )
    assert overridden == EncoderSettings(str(st_cls_dir), "mean", False, 4, "", "D: ")
    legacy = add_st_files(
        make_tiny_bert(tmp_path / "legacy"), pooling="cls", normalize=False, legacy_pooling=True
    )
    # similarity "dot" and no Normalize module: not normalised
    assert read_settings(legacy) == EncoderSettings(str(legacy), "cls", False, 512, "", "")


def test_unsupported_pooling_and_missing_folder(st_cls_dir, tmp_path):
    folder = add_st_files(make_tiny_bert(tmp_path / "maxpool"), pooling="max")
    with pytest.raises(UserError, match=r"1_Pooling/config.json: pooling 'max' is not supported"):
        read_settings(folder)
    with pytest.raises(UserError, match=r"nowhere: model folder not found"):
        read_settings(tmp_path / "nowhere")


def test_pool_by_hand():
    hidden = torch.arange(12, dtype=torch.float32).view(2, 3, 2)  # (B=2, L=3, H=2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])  # right padding
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding
    assert pool(hidden, right, "cls").tolist() == [[0, 1], [6, 7]]
    # mean: ([0,1] + [2,3]) / 2 = [1,2]; ([6,7] + [8,9] + [10,11]) / 3 = [8,9]
    assert pool(hidden, right, "mean").tolist() == [[1, 2], [8, 9]]
    assert pool(hidden, right, "last_token").tolist() == [[2, 3], [10, 11]]
    assert pool(hidden, left, "last_token").tolist() == [[4, 5], [10, 11]]


def test_plain_folder_matches_sentence_transformers_folder_and_library(plain_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    st_mean = add_st_files(make_tiny_bert(tmp_path / "st_mean"), pooling="mean")  # same seed: same weights
    ours_plain = Encoder(read_settings(plain_dir), show_progress=False).encode_passages(TEXTS)
    ours_st = Encoder(read_settings(st_mean), show_progress=False).encode_passages(TEXTS)
    reference = st.SentenceTransformer(str(st_mean), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours_plain, ours_st, atol=1e-6)
    np.testing.assert_allclose(ours_st, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours_st, axis=1), 1.0, atol=1e-5)


def test_cls_prompts_and_truncation_match_sentence_transformers(st_cls_dir):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(st_cls_dir), device="cpu")
    # sentence-transformers 6 reads the max length from the tokenizer, not from sentence_bert_config.json
    model.max_seq_length = 8
    enc = Encoder(read_settings(st_cls_dir), batch_size=2, show_progress=False)
    np.testing.assert_allclose(
        enc.encode_queries(TEXTS), model.encode(TEXTS, prompt_name="query", convert_to_numpy=True), atol=1e-5
    )
    np.testing.assert_allclose(
        enc.encode_passages(TEXTS),
        model.encode(TEXTS, prompt_name="document", convert_to_numpy=True),
        atol=1e-5,
    )


def test_length_sorted_batches_return_input_order(plain_dir):
    enc = Encoder(read_settings(plain_dir), batch_size=2, show_progress=False)
    batched = enc.encode(TEXTS)
    one_by_one = np.concatenate([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert enc.encode([]).shape == (0, 32)


def test_length_sorted_batches_cover_every_position_once():
    batches = length_sorted_batches([3, 5, 5, 1, 4], 2)
    # longest first, ties in input order (positions 1 and 2 both have 5 tokens)
    assert [b.tolist() for b in batches] == [[1, 2], [4, 0], [3]]
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 3, 4]
    assert length_sorted_batches([], 4) == []


def test_token_budget_batches_by_hand():
    # longest first: 10 (1), 10 (3), 7 (4), 5 (0), 3 (2), 1 (5); 20 tokens: 2 x 10, then 2 x 7 (14), then 3 x 3
    # would fit 6 but only two texts are left
    lengths = [5, 10, 3, 10, 7, 1]
    assert [b.tolist() for b in length_sorted_batches(lengths, 64, 20)] == [[1, 3], [4, 0], [2, 5]]
    assert [b.tolist() for b in length_sorted_batches(lengths, 1, 20)] == [[1], [3], [4], [0], [2], [5]]
    # a text longer than the budget still goes, alone
    assert [b.tolist() for b in length_sorted_batches(lengths, 64, 4)][:2] == [[1], [3]]
    assert [len(b) for b in length_sorted_batches([2] * 9, 64, 8)] == [4, 4, 1]


def test_bytes_per_token_and_budget_by_hand():
    from transformers import BertConfig

    minilm = BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12)
    # fp32 packed: 4 x (7 x 384 + 2 x 1536) + 4 x 384 = 24,576
    assert bytes_per_token(minilm, 4, 256, packed=True) == 24_576
    # bf16 padded, 256 tokens: 2 x 5,760 + 1,536 + 2 x 12 heads x 256 x 2 bytes = 25,344
    assert bytes_per_token(minilm, 2, 256, packed=False) == 25_344
    assert batch_tokens(10 * 2**30, 24_576) == 218_453  # half of 10 GiB
    assert batch_tokens(100, 24_576) == 1


def test_cuda_batches_come_from_free_memory(plain_dir, monkeypatch):
    """On CUDA the batch is a token budget from free memory, not batch_size (the wiring, without a GPU)."""
    enc = Encoder(read_settings(plain_dir), batch_size=2, show_progress=False)
    lengths = [7, 3, 9, 9, 4]
    assert [len(b) for b in enc._batches(lengths)] == [2, 2, 1]  # the CPU: batch_size
    per_token = bytes_per_token(enc.model.config, 4, 9, packed=False)
    monkeypatch.setattr(encoder_module.precision, "cuda_free_bytes", lambda device: 2 * 18 * per_token)
    enc.device = torch.device("cuda")
    # 18 tokens: the two 9s, then 7 (2 x 7 = 14 with 4: 3 texts need 21), then 4 and 3
    assert [b.tolist() for b in enc._batches(lengths)] == [[2, 3], [0, 4], [1]]


def test_token_budget_batches_encode_like_fixed_batches(plain_dir, monkeypatch):
    enc = Encoder(read_settings(plain_dir), batch_size=2, show_progress=False)
    fixed = enc.encode(TEXTS)
    monkeypatch.setattr(enc, "_batches", lambda lengths: length_sorted_batches(lengths, 4096, 12))
    np.testing.assert_allclose(enc.encode(TEXTS), fixed, atol=1e-5)


def test_sorted_batches_equal_one_unsorted_padded_batch(plain_dir):
    """The length-sorted, batched path against the whole input padded together in input order."""
    enc = Encoder(read_settings(plain_dir), batch_size=2, show_progress=False)
    feats = enc.tokenizer(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.inference_mode():
        hidden = enc.model(**feats).last_hidden_state
    expected = torch.nn.functional.normalize(pool(hidden, feats["attention_mask"], "mean"), dim=-1).numpy()
    got = enc.encode(TEXTS)
    assert got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # distinct texts, distinct rows: order is tested


def test_bf16_encoding_is_close_to_fp32_and_returns_fp32(plain_dir):
    """bf16 under autocast: the same embeddings within bf16's precision, fp32 out, the weights untouched."""
    fp32 = Encoder(read_settings(plain_dir), batch_size=2, show_progress=False)
    bf16 = Encoder(read_settings(plain_dir), batch_size=2, show_progress=False, dtype="bf16")
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    a, b = fp32.encode(TEXTS), bf16.encode(TEXTS)
    assert b.dtype == np.float32 and {p.dtype for p in bf16.model.parameters()} == {torch.float32}
    assert 0 < np.abs(a - b).max() < 0.05  # it did compute in bf16 (not identical), and closely
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)  # normalised in fp32


def test_encoder_dtype_auto_is_fp32_on_a_cpu_even_with_native_bf16(plain_dir, monkeypatch):
    """bf16 on a CPU moves embeddings in the third decimal (benchmarks/README.md): auto leaves it to the user there;
    on CUDA auto is bf16 (tests/test_precision.py)."""
    for caps in ({"avx512_bf16": False, "avx2": True}, {"amx_bf16": True}):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert Encoder(read_settings(plain_dir), show_progress=False, dtype="auto").dtype == "float32"
        assert Encoder(read_settings(plain_dir), show_progress=False).dtype == "float32"  # the default


@pytest.mark.parametrize(
    ("dtype", "max_length", "widths"), [("float32", 512, None), ("bf16", 512, 16), ("bf16", 7, 7)]
)
def test_bf16_batches_pad_to_a_multiple_of_16_within_max_length(plain_dir, dtype, max_length, widths):
    # bf16 kernels are built per shape on a CPU (memory grows with every new one): bf16 batches take few widths
    settings = read_settings(plain_dir)
    settings = EncoderSettings(
        settings.transformer_dir, settings.pooling, settings.normalize, max_length, "", ""
    )
    enc = Encoder(settings, batch_size=2, show_progress=False, dtype=dtype)
    seen = []
    enc.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].size(1)), with_kwargs=True
    )
    out = enc.encode_passages(TEXTS)
    exact = Encoder(settings, batch_size=2, show_progress=False, dtype="float32")
    lengths = sorted((min(len(ids), max_length) for ids in exact.tokenizer(TEXTS)["input_ids"]), reverse=True)
    if widths is None:
        assert seen == [lengths[0], lengths[2], lengths[4]]  # each batch its own longest text
    else:
        assert seen == [widths] * 3
    np.testing.assert_allclose(out, exact.encode_passages(TEXTS), atol=3e-2)


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
@pytest.mark.parametrize("which", ["tiny_bert_dir", "minilm_dir"])
def test_packed_encoding_equals_padded(request, which, pooling, dtype):
    """pack_sequences (the default on CUDA) forced on a CPU: the same embeddings as the padded batches, in input
    order; fp32 to rounding, bf16 within its precision."""
    settings = read_settings(request.getfixturevalue(which), pooling=pooling)
    padded = Encoder(settings, batch_size=3, show_progress=False, dtype=dtype, pack_sequences="auto")
    packed = Encoder(settings, batch_size=3, show_progress=False, dtype=dtype, pack_sequences=True)
    assert padded.packing is None and packed.packing.ok  # auto is padded on a CPU
    texts = TEXTS + ["cells and genes of the heart " * 6, "virus dose"]
    a, b = padded.encode(texts), packed.encode(texts)
    np.testing.assert_allclose(b, a, atol=2e-2 if dtype == "bf16" else 1e-5)
    assert not np.allclose(b[0], b[1], atol=1e-3)
