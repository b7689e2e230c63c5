#!/usr/bin/env bash
# The main job on a fresh machine (`make main-job`): one Reinforced-IR round on SciFact, configs/round_scifact.yaml:
# SciFact's 809 train queries (100 held out as dev queries) -> SmolLM2-135M answers (transformers, bf16 where native) -> MiniLM-mined hard negatives -> one epoch of
# all-MiniLM-L6-v2 with L_qp + L_qa -> SciFact test answers -> evaluation of the base and the trained model
# in query, answer and fused modes (alpha chosen on the dev queries) -> WORK/report.md. Usage:
#   bash scripts/main_job.sh [DATA_DIR] [WORK_DIR] [round options...]
#   bash scripts/main_job.sh ../shared/data/scifact work/round_scifact --max_train_queries 100 --train.max_steps 4
# DATA_DIR defaults to ../shared/data/scifact; without it, pass a BEIR folder (e.g. one from
# `rir-finetune data get scifact --out data`). Killed and rerun, the round skips its finished stages and resumes
# training from the last checkpoint. Retrieval only (no LLM): bash scripts/retrieval_only.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/scifact}
WORK=${2:-work/round_scifact}
shift $(( $# > 2 ? 2 : $# ))
VENV=${VENV:-.venv}
. "$VENV/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$DATA/corpus.jsonl" ]; then
  echo "error: $DATA is not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/); pass its path as the first argument" >&2
  exit 2
fi
if ! python -c "import gguf" 2>/dev/null; then
  echo "error: the gguf package is not installed (SmolLM2 ships as a GGUF file); run: $VENV/bin/pip install -e '.[gguf]' (make setup does it)" >&2
  exit 2
fi
rir-finetune round --config configs/round_scifact.yaml --data "$DATA" --output_dir "$WORK" "$@"
echo "report: $WORK/report.md (metrics per model and mode: $WORK/eval/)"
