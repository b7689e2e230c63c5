"""The reward rule (upstream's generate_llm_dpo_train_data) on hand-computed embeddings and scores."""

from __future__ import annotations

import numpy as np
import pytest

from rir_finetune.generator.dpo import to_trl_example
from rir_finetune.generator.reward import RewardRule, augmented_scores, choose_pair, pair_prompt
from rir_finetune.precision import cpu_has_bf16

UPSTREAM = RewardRule()  # 0.8 / 0.2, threshold 0.95, best must beat the query


def test_augmented_scores_by_hand():
    q = np.array([1.0, 0.0])
    p = np.array([0.6, 0.8])
    answers = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # 0.8 * (q . p) + 0.2 * (a . p) = 0.48 + 0.2 * [0.8, 0.6, 1.0]
    np.testing.assert_allclose(augmented_scores(q, answers, p, 0.8, 0.2), [0.64, 0.60, 0.68], atol=1e-12)
    # the mix is not re-normalised: weights 1 / 1 add the two dot products
    np.testing.assert_allclose(augmented_scores(q, answers, p, 1.0, 1.0), [1.4, 1.2, 1.6], atol=1e-12)


def test_kept_pair_best_and_worst():
    # raw 0.6: offset 0.48; (0.68 - 0.48) * 0.95 = 0.19 >= 0.60 - 0.48 = 0.12; 0.68 > 0.6
    choice = choose_pair([0.64, 0.60, 0.68], 0.6, ["a", "b", "c"], UPSTREAM)
    assert (choice.chosen, choice.rejected, choice.dropped_by) == (2, 1, None)


def test_best_must_beat_the_query_alone():
    choice = choose_pair([0.65, 0.60], 0.7, ["a", "b"], UPSTREAM)
    assert choice.dropped_by == "not_better_than_query"
    # equal is not better
    assert choose_pair([0.7, 0.1], 0.7, ["a", "b"], UPSTREAM).dropped_by == "not_better_than_query"
    # without rule 1: offset 0.56; (0.65 - 0.56) * 0.95 = 0.0855 >= 0.30 - 0.56 = -0.26
    no_rule1 = RewardRule(require_beats_query=False)
    assert choose_pair([0.65, 0.30], 0.7, ["a", "b"], no_rule1).dropped_by is None


def test_margin_rule_and_its_boundary():
    # raw 0.5: offset 0.4; (0.6 - 0.4) * 0.95 = 0.19 < 0.595 - 0.4 = 0.195
    assert choose_pair([0.6, 0.595], 0.5, ["a", "b"], UPSTREAM).dropped_by == "margin_too_small"
    # exact binary fractions: w_q 0.5, threshold 0.75, raw 0.5 -> offset 0.25; (0.75 - 0.25) * 0.75 = 0.375
    rule = RewardRule(query_weight=0.5, answer_weight=0.5, threshold=0.75)
    assert choose_pair([0.75, 0.625], 0.5, ["a", "b"], rule).dropped_by is None  # 0.375 >= 0.375
    assert choose_pair([0.75, 0.62500001], 0.5, ["a", "b"], rule).dropped_by == "margin_too_small"


def test_same_text_is_dropped_and_ties_take_the_first():
    # passes both upstream rules (raw < 0), but chosen and rejected are the same text
    assert choose_pair([-0.9, -0.95], -1.0, ["x", " x"], UPSTREAM).dropped_by == "same_text"
    choice = choose_pair([0.5, 0.9, 0.9, 0.5], 0.6, ["a", "b", "c", "d"], UPSTREAM)
    assert (choice.chosen, choice.rejected) == (1, 0)


def test_an_empty_answer_makes_no_pair():
    # passes every other rule; train-generator refuses an empty chosen or rejected text
    assert choose_pair([-0.9, -0.95], -1.0, ["x", "  "], UPSTREAM).dropped_by == "empty_answer"
    assert choose_pair([-0.9, -0.95], -1.0, ["", "y"], UPSTREAM).dropped_by == "empty_answer"


def test_pair_prompt_plain_or_chat():
    assert pair_prompt("Q?", None) == "Q?"
    assert pair_prompt("Q?", "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q?"},
    ]


def test_trl_examples_in_the_format_the_model_saw():
    pair = {"prompt": "Claim: x\n\nPassage:", "chosen": "good", "rejected": "bad", "chosen_score": 0.9}
    assert to_trl_example(pair, chat=False, system_prompt=None) == {
        "prompt": "Claim: x\n\nPassage:", "chosen": " good", "rejected": " bad"}  # fmt: skip
    spaced = {**pair, "prompt": "Passage: "}
    assert to_trl_example(spaced, chat=False, system_prompt=None)["chosen"] == "good"
    assert to_trl_example(pair, chat=True, system_prompt="S") == {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Claim: x\n\nPassage:"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    messages = {**pair, "prompt": [{"role": "user", "content": "u"}]}
    assert to_trl_example(messages, chat=False, system_prompt="ignored")["prompt"] == [
        {"role": "user", "content": "u"}
    ]


@pytest.mark.parametrize(
    ("caps", "native"),
    [
        ({"avx512_bf16": True, "avx2": True}, True),
        ({"amx_bf16": True}, True),
        ({"bf16": True, "architecture": "arm64"}, True),
        ({"avx512_f": True, "avx2": True, "avx512_bf16": False}, False),
        ({}, False),
    ],
)
def test_cpu_bf16_detection(caps, native):
    assert cpu_has_bf16(caps) is native


def test_an_answer_weight_of_zero_is_refused_before_any_sampling():
    """e_aug without the answer scores every sample alike: no pair could be kept, after the LLM ran for nothing."""
    from rir_finetune.config import load_config
    from rir_finetune.errors import UserError
    from rir_finetune.generator.reward import RewardConfig

    with pytest.raises(UserError, match="config key 'answer_weight': must be greater than 0, got 0"):
        load_config(RewardConfig, None, ["--answer_weight", "0", "--query_weight", "0"])
