"""sentence-transformers' side of the head-to-head: MultipleNegativesRankingLoss on the shared hard-negative file.

    python st_train.py --model MINILM --train_data train_hn.jsonl --output_dir OUT [--group_size 4 ...]

The text-form records ({"query", "pos", "neg"}) become one row per query: anchor, one positive and group_size - 1
negatives, drawn with random.Random(seed) per record (FlagEmbedding and rir-finetune draw theirs per epoch; for one
epoch that is one draw each as well). MultipleNegativesRankingLoss with scale 1/temperature scores every anchor
against every positive and negative of the batch: the same in-batch + hard-negative InfoNCE as the other two tools.
sentence-transformers has one max_seq_length for all texts: it is set to the passage length (SciFact queries are
far below the query length of the other tools, so nothing is truncated differently).
"""

from __future__ import annotations

import argparse
import json
import random


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train_data", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--group_size", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--learning_rate", type=float, default=2e-5)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument(
        "--bf16", default="False", help="True: the Trainer's bf16 autocast (as FlagEmbedding's --bf16)"
    )
    args = parser.parse_args()

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows: dict[str, list[str]] = {"anchor": [], "positive": []}
    negative_columns = [f"negative_{i + 1}" for i in range(args.group_size - 1)]
    for column in negative_columns:
        rows[column] = []
    with open(args.train_data) as f:
        for index, line in enumerate(f):
            record = json.loads(line)
            rng = random.Random(args.seed * 1_000_003 + index)
            rows["anchor"].append(record["query"])
            rows["positive"].append(rng.choice(record["pos"]))
            for column, negative in zip(
                negative_columns, rng.sample(record["neg"], len(negative_columns)), strict=True
            ):
                rows[column].append(negative)
    dataset = Dataset.from_dict(rows)

    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = args.max_seq_length
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        use_cpu=True,
        bf16=args.bf16.lower() in {"true", "1", "yes"},
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    trainer.train()
    model.save(args.output_dir)


if __name__ == "__main__":
    main()
