#!/usr/bin/env bash
# GPU readiness (issue 19): step speed with MFU, peak memory, and a 2-process NCCL equality check, in one script,
# under 10 minutes on one node. Results in $OUT (default work/gpu): step.json, memory.json, ddp.json, summary.txt.
#
#   bash benchmarks/gpu.sh                 # needs the project's venv with a CUDA torch, and a GPU
#   OUT=work/gpu PEAK_TFLOPS=989 bash benchmarks/gpu.sh
#
# 1. benchmarks/gpu_check.py step: MiniLM and a BERT-base-shaped model (random init), 16 and 64 queries x 4
#    passages, query 64 / passage 256 tokens, bf16 autocast, SDPA: bare forward+backward vs ours (plain and with the
#    gradient cache), median s/step, queries/s, MFU.
# 2. benchmarks/gpu_check.py memory: peak CUDA memory at 16 / 64 / 256 queries x 4, gradient cache on and off.
# 3. NCCL equality: `rir-finetune train`, one SGD step of a no-dropout BERT, cross-device negatives, fp32 (TF32 off):
#    torchrun --nproc_per_node 2 with 8 queries per process against one process with the global batch of 16; the
#    saved weights must agree to 1e-5 (and the step must move them). NCCL needs one GPU per process: with fewer
#    than 2 GPUs the check runs the same comparison with gloo on the CPU and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-work/gpu}
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2; exit 2; }
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
log "GPUs: $NGPU x $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'); load $(cut -d' ' -f1-3 /proc/loadavg)"
PEAK=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK=(--peak_tflops "$PEAK_TFLOPS")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log "1/3 step benchmark"
timeout 300 "$PY" benchmarks/gpu_check.py step --out "$OUT/step.json" "${PEAK[@]}" | grep "^{'model'" | tee -a "$OUT/summary.txt"

log "2/3 memory benchmark"
timeout 120 "$PY" benchmarks/gpu_check.py memory --out "$OUT/memory.json" | grep "^{'queries'" | tee -a "$OUT/summary.txt"

log "3/3 two processes vs one (one SGD step, global batch 16)"
DDP="$OUT/ddp"
rm -rf "$DDP" && mkdir -p "$DDP"
"$PY" benchmarks/gpu_check.py tiny-model "$DDP/model"
"$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from common import scifact_hn_records, write_records
try:
    recs = scifact_hn_records()[:64]
except OSError:
    recs = [{'query': f'query {i} about cells', 'pos': [f'passage {i} on cells and genes'],
             'neg': [f'other passage {i} {j}' for j in range(4)]} for i in range(64)]
write_records(Path('$DDP/train.jsonl'), recs)"
COMMON=(--model_name_or_path "$DDP/model" --train_data "$DDP/train.jsonl" --max_steps 1 --train_group_size 4
        --query_max_len 64 --passage_max_len 256 --optim sgd --learning_rate 0.5 --save_strategy no
        --negatives_cross_device true --training_type retrieval --dataloader_drop_last true --report_to none
        --sentence_pooling_method mean --normalize_embeddings true --temperature 0.02 --seed 7
        --dataloader_num_workers 0 --tf32 false)
if [ "$NGPU" -ge 2 ]; then
  BACKEND=(--ddp_backend nccl); ONE=(); WHERE="NCCL, GPUs 0 and 1"
else
  BACKEND=(--ddp_backend gloo --use_cpu true); ONE=(--use_cpu true)
  WHERE="gloo on the CPU: NCCL needs one GPU per process and this machine has $NGPU"
fi
log "backend: $WHERE"
timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m rir_finetune train "${COMMON[@]}" \
  --per_device_train_batch_size 8 --output_dir "$DDP/two" "${BACKEND[@]}" > "$DDP/two.log" 2>&1 \
  || { tail -20 "$DDP/two.log" >&2; exit 1; }
CUDA_VISIBLE_DEVICES=0 timeout 120 "$PY" -m rir_finetune train "${COMMON[@]}" --per_device_train_batch_size 16 \
  --output_dir "$DDP/one" "${ONE[@]}" > "$DDP/one.log" 2>&1 || { tail -20 "$DDP/one.log" >&2; exit 1; }
if "$PY" benchmarks/gpu_check.py compare "$DDP/one" "$DDP/two" "$DDP/model" --out "$OUT/ddp.json" > /dev/null; then
  log "2 processes == 1 process ($WHERE): $(cat "$OUT/ddp.json" | tr -d '\n ')"
else
  log "MISMATCH between 2 processes and 1 ($WHERE): $(cat "$OUT/ddp.json" | tr -d '\n ')"; exit 1
fi
log "done: $OUT"
