#!/bin/bash
# The checks only a GPU machine can run, as one short script (a few minutes on 2 GPUs):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. FSDP2 and DeepSpeed ZeRO-3 with 2 GPU processes (NCCL, bf16): each trains a small ViT with all three
#    sparsity levels for 6 steps, is stopped, and resumes to 12; the log of each run goes to OUT_DIR.
# Each check prints PASS or FAIL on one line; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=4 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
$PY -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)" | tee "$OUT/versions.txt"

SHARDS="$OUT/shards"
$PY - "$SHARDS" <<'PYEOF'
import sys
from pathlib import Path
from tests.conftest import NUM_CLASSES, synthetic_samples
from trivit.datasets.shards import write_index, write_split
folder = Path(sys.argv[1])
splits = {"train": write_split(synthetic_samples(512, size=32), folder, "train", 32),
          "val": write_split(synthetic_samples(128, size=32, seed=1), folder, "val", 32)}
write_index(folder, splits, [f"class{i}" for i in range(NUM_CLASSES)])
PYEOF

COMMON=(data.train_urls="$SHARDS" data.val_urls="$SHARDS" data.batch_size=32 data.eval_batch_size=64
        data.num_workers=2 data.mean=[0.3] data.std=[0.3] data.auto_augment=null model.img_size=32
        model.patch_size=4 model.in_chans=1 "model.timm_kwargs={embed_dim: 192, depth: 4, num_heads: 3}"
        optim.ema_decay=null schedule.epochs=2 schedule.warmup_epochs=0 checkpoint.every_steps=6
        logging.every_steps=1 logging.progress_bar=false sparsity.tokens.keep_rate=0.7
        sparsity.attention.keep_rate=0.2 sparsity.schedule.start_epochs=0 sparsity.schedule.span_epochs=0.5
        sparsity.examples.policy=forgetting sparsity.examples.refresh_every_epochs=1)
FAILED=0
run_check() {  # name, trivit overrides...
    local name=$1; shift
    local run="$OUT/$name"
    for steps in 6 12; do
        torchrun --nproc-per-node 2 -m trivit train run_dir="$run" "${COMMON[@]}" "$@" schedule.max_steps=$steps \
            >> "$OUT/$name.log" 2>&1 || { echo "FAIL $name (steps $steps): see $OUT/$name.log"; FAILED=1; return; }
    done
    if grep -q "resumed from .*step_00000006" "$OUT/$name.log" && [ -f "$run/model.safetensors" ]; then
        echo "PASS $name: 2 GPUs, stopped at 6, resumed to 12; losses: $($PY -c "import json,sys; print([round(json.loads(l)['loss'], 4) for l in open(sys.argv[1])])" "$run/metrics.jsonl")"
    else
        echo "FAIL $name: no resume from step 6 or no model.safetensors; see $OUT/$name.log"; FAILED=1
    fi
}
run_check fsdp_bf16 engine.backend=fsdp engine.precision=bf16
run_check zero3_bf16 engine.backend=deepspeed engine.zero_stage=3 engine.precision=bf16
exit $FAILED
