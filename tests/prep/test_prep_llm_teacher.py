"""`rir-finetune score --model_type llm`: listwise (RankGPT) and query-likelihood (UPR) LLM teachers.

Prompt building and permutation repair are pure and tested exactly; the listwise teacher runs against a fake backend
that returns fixed replies (the backend is not under test there); query likelihood runs through the real transformers
backend with a tiny random Llama and must equal the same computation done by hand with plain transformers.
"""

from __future__ import annotations

import pytest

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
