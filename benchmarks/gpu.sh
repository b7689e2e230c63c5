#!/usr/bin/env bash
# The GPU check in one run of under 8 minutes on a lent GPU; results in $OUT (default work/gpu), at most 7 files:
# summary.txt, step.json, encode.json, generate.json, round.json, round_report.md, compile.jsonl (and ddp.json with
# 2+ GPUs).
#
#   bash ../shared/gpu/prepare.sh                        # here, once: the .gpu/ payload (wheels, MiniLM, SmolLM2 shape)
#   source .gpu/env.sh && bash benchmarks/gpu.sh         # on the GPU machine (device tool: carry [".gpu"])
#   SMOKE=1 bash benchmarks/gpu.sh                       # toy sizes on any machine (a CPU too): that every part runs
#   BUDGET=420 PEAK_TFLOPS=989 bash benchmarks/gpu.sh    # seconds for parts 1-5 (default 450); bf16 dense peak
#
# 1. step: all-MiniLM-L6-v2 and a BERT-base-shaped random model, 16 / 64 / 256 queries x 4 passages (query 64 /
#    passage 256 tokens, bf16): bare transformers vs ours plain (packed on CUDA) vs ours plain padded vs ours with the
#    gradient cache forced on; s/step, queries/s, MFU over the real tokens, peak memory, what `gradient_cache: auto`
#    chooses (benchmarks/gpu_check.py step).
# 2. encode: SciFact's 5,183 passages with MiniLM, packed and padded, passages/s.
# 3. generate: SmolLM2-135M's shape (random weights: speed only) on 809 SciFact claims, 128 new tokens, at the batch
#    the transformers backend sizes from free memory; tokens/s.
# 4. the main job's round (configs/round_scifact.yaml with that generator, sampling at temperature 1: greedy random
#    weights write empty answers) end to end: wall per stage, the report.
# 5. torch.compile of the encoder (MiniLM, SciFact passages, as encoding ships: bf16, packed): eager vs compiled,
#    first pass (compile included) and steady state; not counted as a failure of the check.
# 6. with 2+ GPUs: NCCL equality, one SGD step of 2 processes x 8 queries against 1 x 16 (weights to 1e-5).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
OUT=${OUT:-work/gpu}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
SCALE=1
[ "$SMOKE" = 1 ] && SCALE=4  # a CPU is slow even at toy sizes
left() { local c=$(($1 * SCALE)) l=$((BUDGET - SECONDS)); [ "$l" -lt "$c" ] && echo "$((l > 10 ? l : 10))" || echo "$c"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
S=()
if [ "$SMOKE" = 1 ]; then
  S=(--smoke)
  log "SMOKE run on $("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")'): toy sizes, no figures"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA device visible to $PY (SMOKE=1 runs the toy sizes anywhere)" >&2; exit 2; }
  log "GPUs: $("$PY" -c 'import torch; print(torch.cuda.device_count(), "x", torch.cuda.get_device_name())'); $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
PEAK=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK=(--peak_tflops "$PEAK_TFLOPS")
ok=1

log "1/5 training step (bare / ours plain / ours padded / ours gradient cache)"
timeout "$(left 170)" "$PY" benchmarks/gpu_check.py step --out "$OUT/step.json" "${S[@]}" "${PEAK[@]}" \
  | tee -a "$OUT/summary.txt" || { log "step: failed or timed out"; ok=0; }

log "2/5 encoding SciFact's corpus (packed vs padded)"
timeout "$(left 60)" "$PY" benchmarks/gpu_check.py encode --out "$OUT/encode.json" "${S[@]}" \
  | tee -a "$OUT/summary.txt" || { log "encode: failed or timed out"; ok=0; }

LM=/tmp/smol_random
if [ "$SMOKE" = 1 ]; then LM=/tmp/rir_tiny_lm; [ -f "$LM/config.json" ] || "$PY" benchmarks/gpu_check.py tiny-lm "$LM"; fi
log "3/5 generation at the auto batch ($LM)"
timeout "$(left 90)" "$PY" benchmarks/gpu_check.py generate --model "$LM" --out "$OUT/generate.json" "${S[@]}" \
  2> >(grep -E "batches of up to" | tee -a "$OUT/summary.txt" >&2) | tee -a "$OUT/summary.txt" \
  || { log "generate: failed or timed out"; ok=0; }

ROUND=/tmp/rir_gpu_round
DATA=../shared/data/scifact
# random weights decode greedily into the same whitespace token, and empty answers are refused by training: sample
EXTRA=(--llm.temperature 1.0)
if [ "$SMOKE" = 1 ]; then
  DATA=/tmp/rir_mini_scifact
  rm -rf "$DATA" && "$PY" benchmarks/gpu_check.py mini-beir ../shared/data/scifact "$DATA"
  EXTRA+=(--llm.max_new_tokens 8 --train.max_steps 2 --dev_queries 8)
fi
rm -rf "$ROUND"
log "4/5 the main job's round (configs/round_scifact.yaml, generator $LM)"
# the round leaves 60 s of the budget to part 5
RCAP=$(left 400); [ "$RCAP" -gt 120 ] && RCAP=$((RCAP - 60))
if timeout "$RCAP" "$PY" -m rir_finetune round --config configs/round_scifact.yaml --output_dir "$ROUND" \
    --data "$DATA" --llm.model "$LM" "${EXTRA[@]}" > "$ROUND.log" 2>&1; then
  log "round: done"
else
  log "round: failed or timed out (last lines below)"; tail -5 "$ROUND.log" | tee -a "$OUT/summary.txt"; ok=0
fi
grep -E "^round: |gradient_cache|batches of up to|pack_sequences" "$ROUND.log" | tee -a "$OUT/summary.txt" || true
"$PY" benchmarks/gpu_check.py walls "$ROUND" --out "$OUT/round.json"
tee -a "$OUT/summary.txt" < "$OUT/round.json"
[ -f "$ROUND/report.md" ] && cp "$ROUND/report.md" "$OUT/round_report.md"

log "5/5 torch.compile of the encoder: eager vs compiled, SciFact passages (benchmarks/compile_encode.py)"
N=5183
[ "$SMOKE" = 1 ] && N=32
timeout "$(left 60)" "$PY" benchmarks/compile_encode.py --passages "$N" --out "$OUT/compile.jsonl" 2>/dev/null \
  | tee -a "$OUT/summary.txt" || log "compile: failed or timed out (what it measured is in compile.jsonl)"

if [ "$NGPU" -ge 2 ] && [ "$SMOKE" != 1 ]; then
  log "6: two processes vs one over NCCL (one SGD step, global batch 16)"
  DDP=/tmp/rir_gpu_ddp
  rm -rf "$DDP" && mkdir -p "$DDP"
  "$PY" benchmarks/gpu_check.py tiny-model "$DDP/model"
  "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from common import scifact_hn_records, write_records
write_records(Path('$DDP/train.jsonl'), scifact_hn_records()[:64])"
  COMMON=(--model_name_or_path "$DDP/model" --train_data "$DDP/train.jsonl" --max_steps 1 --train_group_size 4
          --query_max_len 64 --passage_max_len 256 --optim sgd --learning_rate 0.5 --save_strategy no
          --negatives_cross_device true --training_type retrieval --dataloader_drop_last true --report_to none
          --sentence_pooling_method mean --normalize_embeddings true --temperature 0.02 --seed 7
          --dataloader_num_workers 0 --tf32 false --bf16 false --pack_sequences false)
  timeout "$(left 120)" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m rir_finetune train \
    "${COMMON[@]}" --per_device_train_batch_size 8 --output_dir "$DDP/two" --ddp_backend nccl > "$DDP/two.log" 2>&1 \
    && CUDA_VISIBLE_DEVICES=0 timeout "$(left 60)" "$PY" -m rir_finetune train "${COMMON[@]}" \
      --per_device_train_batch_size 16 --output_dir "$DDP/one" > "$DDP/one.log" 2>&1 \
    && "$PY" benchmarks/gpu_check.py compare "$DDP/one" "$DDP/two" "$DDP/model" --out "$OUT/ddp.json" \
      | tee -a "$OUT/summary.txt" || { log "NCCL equality: failed"; tail -5 "$DDP"/*.log; ok=0; }
else
  log "6: NCCL equality skipped ($NGPU GPU(s); NCCL needs one per process; gloo on the CPU: benchmarks/README.md)"
fi
log "done in ${SECONDS} s: $OUT"
[ "$ok" = 1 ]
