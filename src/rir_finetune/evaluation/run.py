"""``rir-finetune eval``: score a model folder on BEIR-layout data and write the results.

    rir-finetune eval --model DIR --data ../shared/data/scifact --split test --output_dir OUT
    rir-finetune eval --model DIR --data DATA --answers answers.jsonl --mode fused --alpha 0.8 --output_dir OUT

Writes ``OUT/metrics.json`` (flat: ``ndcg@10``, ``recall@100``, ``mrr@10``, ...), ``OUT/per_query.json`` (the same
metrics for every judged query, for ``rir-finetune compare``), ``OUT/metrics.md``, ``OUT/run.trec`` and
``OUT/eval_config.json`` (the arguments and the encoder settings actually used).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rir_finetune import files, precision
from rir_finetune.config import build_configs, option, to_dict
from rir_finetune.cpu_memory import keep_freed_memory
from rir_finetune.errors import UserError
from rir_finetune.evaluation.answers import ANSWER_PREFIX, DEFAULT_ALPHA, MODES, check_answers, load_answers
from rir_finetune.evaluation.metrics import DEFAULT_K_VALUES, mean_metrics, per_query_metrics
from rir_finetune.evaluation.outputs import (
    atomic_write,
    metrics_table,
    write_metrics_json,
    write_metrics_md,
    write_per_query_json,
    write_trec_run,
)
from rir_finetune.evaluation.retrieval import run_retrieval
from rir_finetune.precision import DEVICE_HELP, ENCODE_DTYPE_HELP, PACK_HELP
from rir_finetune.retrieval.corpus import CorpusFile
from rir_finetune.retrieval.data import DEFAULT_CORPUS_TEXT_FORMAT, load_beir
from rir_finetune.retrieval.index import CorpusIndexKeys
from rir_finetune.retrieval.model_folder import POOLING_METHODS, read_settings
from rir_finetune.retrieval.search import BACKENDS


@dataclass
class EvalArguments(CorpusIndexKeys):
    model: str | None = option(
        None, "model folder: ours, any sentence-transformers folder, or a plain transformers one (required)"
    )
    data: str | None = option(None, "data folder, BEIR layout or FlagEmbedding's custom layout (required)")
    split: str = option(
        "test", "qrels/<split>.tsv (BEIR) or <split>_queries.jsonl + <split>_qrels.jsonl (custom)"
    )
    output_dir: str | None = option(
        None, "where metrics.json, per_query.json, metrics.md, run.trec, eval_config.json go (required)"
    )
    mode: str = option("query", "query | answer | fused (SPEC section 5)")
    answers: str | None = option(
        None, "JSONL: _id|qid|query_id and answer|text; needed by answer and fused modes"
    )
    alpha: float = option(
        DEFAULT_ALPHA,
        "fused: alpha * E_query(query) + (1 - alpha) * E_passage(prefix + answer)",
        range="[0, 1]",
    )
    answer_prefix: str = option(ANSWER_PREFIX, "prepended to every answer before encoding it as a passage")
    renormalize: bool = option(False, "L2-normalise the fused vector (changes scores, not rankings)")
    pooling: str | None = option(
        None, "cls | mean | last_token; None: what the folder says (plain folder: mean)"
    )
    normalize: bool | None = option(
        None, "L2-normalise embeddings; None: the folder's Normalize module / cosine similarity"
    )
    max_length: int | None = option(
        None, "tokens per text; None: the folder's max_seq_length / model_max_length", range=">=1"
    )
    query_instruction: str | None = option(None, 'None: the folder\'s "query" prompt, else nothing')
    passage_instruction: str | None = option(
        None, 'None: the folder\'s "document"/"passage" prompt, else nothing'
    )
    corpus_text_format: str = option(
        DEFAULT_CORPUS_TEXT_FORMAT, "document text, stripped; fields {title} and {text}"
    )
    batch_size: int = option(
        64,
        "texts per forward pass on a CPU (length-sorted; 64 is faster than 32 there, benchmarks/); on CUDA as many as "
        "half the free memory holds",
        range=">=1",
    )
    k_values: list[int] = option(factory=lambda: list(DEFAULT_K_VALUES), help="metric cut-offs", range=">=1")
    top_k: int | None = option(None, "documents retrieved per query; None: max(k_values)", range=">=1")
    ignore_identical_ids: bool = option(True, "drop a hit whose doc id equals the query id (BEIR's default)")
    search_backend: str = option("auto", "auto (faiss if importable) | faiss | torch")
    max_queries: int | None = option(
        None, "evaluate only the first N judged queries (by id), e.g. for a quick look", range=">=1"
    )
    cache_dir: str | None = option(
        None, "corpus-embedding cache; None: $RIR_FINETUNE_CACHE or ~/.cache/rir_finetune/embeddings"
    )
    use_cache: bool = option(True, "false: always encode the corpus, store nothing")
    device: str = option("auto", f"the encoder's device ({DEVICE_HELP})")
    dtype: str = option("auto", ENCODE_DTYPE_HELP)
    pack_sequences: bool | str = option("auto", PACK_HELP)
    trust_remote_code: bool = option(False, "allow custom modelling code from the model folder")
    show_progress: bool = option(True, "tqdm progress bars on stderr")

    def __post_init__(self):
        for key in ("model", "data", "output_dir"):
            if not getattr(self, key):
                raise UserError(
                    f"config key {key!r}: required (rir-finetune eval --model DIR --data DIR --output_dir DIR)"
                )
        checks = [
            ("mode", self.mode in MODES, f"must be one of {', '.join(MODES)}"),
            (
                "pooling",
                self.pooling is None or self.pooling in POOLING_METHODS,
                f"must be one of {', '.join(POOLING_METHODS)}",
            ),
            ("search_backend", self.search_backend in BACKENDS, f"must be one of {', '.join(BACKENDS)}"),
            ("k_values", bool(self.k_values), "must list at least one k"),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise UserError(f"config key {key!r}: {msg}, got {getattr(self, key)!r}")
        self.dtype = precision.check_dtype(self.dtype)
        self.pack_sequences = precision.true_false_or_auto(self.pack_sequences, "pack_sequences")
        self.top_k = max(self.k_values) if self.top_k is None else self.top_k
        if self.top_k < max(self.k_values):
            raise UserError(
                f"config key 'top_k': {self.top_k} is below the largest k value {max(self.k_values)}"
            )
        try:
            self.corpus_text_format.format(title="", text="")
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(
                f"config key 'corpus_text_format': only {{title}} and {{text}} may appear ({e})"
            ) from None
        if self.mode != "query" and not self.answers:
            raise UserError(f"config key 'answers': mode {self.mode!r} needs --answers FILE")
        super().__post_init__()  # the corpus store and index keys


def run_eval(config_file: str | None, overrides: list[str]) -> dict[str, float]:
    """The ``eval`` command: build :class:`EvalArguments` from the config file and overrides, then evaluate."""
    (args,) = build_configs([EvalArguments], config_file, overrides)
    return evaluate_folder(args)


def evaluate_folder(args: EvalArguments) -> dict[str, float]:
    """Evaluate ``args.model`` on ``args.data`` and write the result files; returns the metrics."""
    keep_freed_memory()
    start = time.perf_counter()
    # every output location before any work; the output folder is never an input folder
    out = files.check_output_dir(
        args.output_dir, key="output_dir", reads=[args.model, args.data], may_hold_inputs=True
    )  # eval writes five named files (checked next), never sub-folders
    for name in ("metrics.json", "per_query.json", "metrics.md", "run.trec", "eval_config.json"):
        files.check_output_file(out / name, key="output_dir", reads=[args.answers])
    precision.check_device(args.device)
    settings = read_settings(
        args.model,
        pooling=args.pooling,
        normalize=args.normalize,
        max_length=args.max_length,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
    )
    # the corpus is streamed into the embedding store, never held in memory as a whole
    dataset = load_beir(args.data, args.split, read_corpus=False).limit_queries(args.max_queries)
    answers = None
    if args.mode != "query":
        answers = load_answers(args.answers)
        check_answers(answers, sorted(dataset.queries), args.answers)
    _warn_identical_relevant(dataset.qrels, args.ignore_identical_ids)

    # transformers is slow to import: only once the inputs are known to be valid
    from rir_finetune.retrieval.encoder import Encoder
    from rir_finetune.retrieval.index import CorpusSearcher
    from rir_finetune.retrieval.sharded import encode_corpus

    def make_encoder() -> Encoder:
        return Encoder(
            settings,
            batch_size=args.batch_size,
            device=args.device,
            show_progress=args.show_progress,
            trust_remote_code=args.trust_remote_code,
            dtype=args.dtype,
            pack_sequences=args.pack_sequences,
        )

    encoded = encode_corpus(
        CorpusFile(dataset.corpus_file, args.corpus_text_format),
        make_encoder,
        model_dir=args.model,
        settings=settings,
        store_dtype=args.store_dtype,
        shard_size=args.shard_size,
        cache_dir=args.cache_dir,
        use_cache=args.use_cache,
        watch_ids=dataset.judged_lines,
        check=lambda scan: dataset.check_judged_documents(scan.rows_of_ids),
    )
    if encoded is None:  # another rank of torchrun: its shards are stored; rank 0 searches and writes
        return {}
    print(encoded.note, file=sys.stderr)
    encoder = encoded.encoder
    try:
        searcher = CorpusSearcher(encoded.store, args, backend=args.search_backend)
        run = run_retrieval(
            encoder.encode_queries,
            encoder.encode_passages,
            dataset,
            top_k=args.top_k,
            ignore_identical_ids=args.ignore_identical_ids,
            search_backend=args.search_backend,
            corpus_text_format=args.corpus_text_format,
            mode=args.mode,
            answers=answers,
            alpha=args.alpha,
            answer_prefix=args.answer_prefix,
            renormalize=args.renormalize,
            answers_source=str(args.answers),
            search=searcher.search,
            doc_ids=encoded.store.ids(),
        )
    finally:
        encoded.close()
    print(searcher.summary(), file=sys.stderr)
    per_query = per_query_metrics(dataset.qrels, run, args.k_values)
    metrics = mean_metrics(per_query)
    title = f"{Path(args.model).name} on {dataset.name} ({args.split}, mode {args.mode})"
    write_metrics_json(out / "metrics.json", metrics)
    write_per_query_json(out / "per_query.json", per_query)
    write_metrics_md(out / "metrics.md", metrics, title)
    write_trec_run(out / "run.trec", run)
    record = {
        "arguments": to_dict(args),
        "encoder": asdict(settings),
        # what "auto" became on this machine: bf16 on a GPU moves metrics in the third decimal
        "computed": {
            "device": str(encoder.device),
            "dtype": encoder.dtype,
            "packed": bool(encoder.packing is not None and encoder.packing.ok),
        },
        "queries": len(dataset.queries),
        "documents": encoded.scan.count,
        "cache": {
            "dir": str(encoded.cache_dir) if encoded.cache_dir else None,
            "key": encoded.key,
            "hit": encoded.hit,
        },
        "search": searcher.report(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write(out / "eval_config.json", lambda f: f.write(json.dumps(record, indent=2) + "\n"))
    print(metrics_table(metrics, title))
    return metrics


def _warn_identical_relevant(qrels: dict[str, dict[str, int]], ignore_identical_ids: bool) -> None:
    """ignore_identical_ids drops judged-relevant documents when query and doc ids share one namespace by chance."""
    clashes = sorted(q for q, docs in qrels.items() if docs.get(q, 0) > 0)
    if ignore_identical_ids and clashes:
        print(
            f"warning: {len(clashes)} queries have a relevant document with their own id ({', '.join(clashes[:5])}); "
            "ignore_identical_ids drops it from the run. Pass --ignore_identical_ids false if the ids are unrelated.",
            file=sys.stderr,
        )
