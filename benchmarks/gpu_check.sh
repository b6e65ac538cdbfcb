#!/bin/bash
# The checks only a GPU machine can run, as one script that fits in 10 minutes, writing one report:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu-check; report: OUT_DIR/REPORT.md)
# Set-up: PYTHON=/path/to/python uses that environment as it is (trivit installed in it, e.g. pip install
# -e .); otherwise the README's set-up (make .venv/.installed, with TORCH= for the CUDA build, see the
# Makefile) runs if .venv is missing. BENCH_MODELS="model:batch ..." changes the benchmarked models.
# 1. trivit bench speed in bf16 for deit_small, deit_base, vit_large, with peak CUDA memory: eager,
#    timm dense vs tokens 0.7 vs tokens 0.7 + attention 0.2 vs all three vs 16 semantic tokens; then compiled (against timm
#    dense compiled), tokens 0.7 and all three (each keep rate is a graph to compile); flex_attention
#    against SDPA; NViT's block latency table of deit_base.
# 2. Training with all three levels for 6 steps, stopped, resumed to 12: DDP over 2 GPUs on NCCL
#    (on a 1-GPU machine: one process; the 2-GPU checks say SKIP), FSDP2 and ZeRO-3 in bf16.
# Each step has its own time limit inside BUDGET_S (540 s); the report says what ran, passed, was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
REPORT="$OUT/REPORT.md"
if [ -z "${PYTHON:-}" ]; then
    [ -x .venv/bin/python ] || make .venv/.installed ${TORCH:+TORCH="$TORCH"} || { echo "set-up failed"; exit 1; }
    PYTHON=.venv/bin/python
fi
export OMP_NUM_THREADS=4 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
{
    echo "# trivit GPU check, $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PYTHON -c "
import importlib.util, torch, timm
deepspeed = importlib.import_module('deepspeed').__version__ if importlib.util.find_spec('deepspeed') else 'not installed'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'deepspeed', deepspeed)"
    echo '```'
} > "$REPORT"
FAILED=0

# 1. Speed: eager bf16 for every model first (quick), then compiled, each bench under its own limit and
#    all within the script's budget, so that a slow compile costs only its own table.
START=$(date +%s)
BUDGET=${BUDGET_S:-540}   # seconds for the whole script; 200 of them are kept for the flex and training checks
bench() {  # title, model, batch, limit, bench options...
    local title=$1 model=$2 batch=$3 limit=$4; shift 4
    local left=$(( BUDGET - 200 - ($(date +%s) - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "- $model, $title: skipped, the time budget is spent" >> "$REPORT"; return; fi
    local name="bench-$title-$model"
    timeout "$limit" $PYTHON -m trivit bench speed --models "$model" --batch "$batch" --precision bf16 \
        --repeats 3 --steps 3 --warmup 2 --out "$OUT/$name" --overwrite "$@" > "$OUT/$name.log" 2>&1
    if [ -f "$OUT/$name/speed.md" ]; then
        echo -e "\n### $model, $title\n" >> "$REPORT"; cat "$OUT/$name/speed.md" >> "$REPORT"
    else
        echo "- $model, $title: not finished within ${limit} s; how far it got: $(grep -c 'ready in' "$OUT/$name.log") of its variants ready (see $name.log)" >> "$REPORT"
    fi
}
echo -e "\n## trivit bench speed (bf16)" >> "$REPORT"
MODELS=${BENCH_MODELS:-deit_small_patch16_224:64 deit_base_patch16_224:64 vit_large_patch16_224:32}
for spec in $MODELS; do
    IFS=: read -r model batch <<< "$spec"
    bench eager "$model" "$batch" 90 --variants tokens0.7 tokens0.7+attention0.2 all3 semantic16
done
for spec in $MODELS; do
    IFS=: read -r model batch <<< "$spec"
    bench compiled "$model" "$batch" 200 --compile on --variants tokens0.7 all3
done

# 1b. sparsity.attention.kernel=flex on CUDA (compiled) against sdpa: one training step's loss and gradients.
echo -e "\n## flex_attention on CUDA against SDPA\n" >> "$REPORT"
timeout 150 $PYTHON - >> "$REPORT" 2> "$OUT/flex.log" <<'PYEOF' || echo "- FAIL flex: see flex.log" >> "$REPORT"
import torch
from trivit.sparse import create_vit
results = {}
for kernel in ("sdpa", "flex"):
    torch.manual_seed(0)
    sparsity = {"tokens": {"keep_rate": 0.7, "locations": [1, 2]}, "attention": {"keep_rate": 0.2, "kernel": kernel}}
    model = create_vit("deit_small_patch16_224", sparsity, depth=4, num_classes=10, drop_path_rate=0.0).cuda()
    images, labels = torch.randn(8, 3, 224, 224, device="cuda"), torch.arange(8, device="cuda")
    loss = torch.nn.functional.cross_entropy(torch.compile(model, dynamic=False)(images), labels)
    loss.backward()
    results[kernel] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
(sdpa_loss, sdpa_grad), (flex_loss, flex_grad) = results["sdpa"], results["flex"]
error = ((flex_grad - sdpa_grad).norm() / sdpa_grad.norm()).item()
verdict = "PASS" if abs(flex_loss - sdpa_loss) < 1e-4 and error < 1e-3 else "FAIL"
print(f"- {verdict} flex: compiled fp32 step, loss {flex_loss:.6f} vs sdpa {sdpa_loss:.6f}, gradient relative error {error:.1e}")
PYEOF

# 1c. NViT's block latency table of deit_base on this GPU (trivit prune's latency model).
echo -e "\n## NViT block latency table (deit_base, fp32, batch 64)\n" >> "$REPORT"
timeout 90 $PYTHON -m trivit bench latency-table --model deit_base_patch16_224 --device cuda --batch 64 \
    --out "$OUT/latency-deit_base.json" >> "$REPORT" 2> "$OUT/latency.log" \
    || echo "- FAIL latency table: see latency.log" >> "$REPORT"

# 2. Training, stopped and resumed.
SHARDS="$OUT/shards"
$PYTHON - "$SHARDS" <<'PYEOF'
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
echo -e "\n## Training with all three levels: 6 steps, stopped, resumed to 12\n" >> "$REPORT"
run_check() {  # name, processes, trivit overrides...
    local name=$1 procs=$2; shift 2
    local run="$OUT/$name"
    if [ "$procs" -gt "$GPUS" ]; then
        echo "- SKIP $name: needs $procs GPUs (NCCL takes one per rank), this machine has $GPUS" >> "$REPORT"; return
    fi
    if [ "$name" = zero3_bf16 ] && ! $PYTHON -c "import deepspeed" 2>/dev/null; then
        echo "- SKIP $name: deepspeed is not installed" >> "$REPORT"; return
    fi
    for steps in 6 12; do
        timeout 150 $PYTHON -m torch.distributed.run --nproc-per-node "$procs" -m trivit train run_dir="$run" \
            "${COMMON[@]}" "$@" schedule.max_steps=$steps >> "$OUT/$name.log" 2>&1 \
            || { echo "- FAIL $name (steps $steps): see $name.log" >> "$REPORT"; FAILED=1; return; }
    done
    if grep -q "resumed from .*step_00000006" "$OUT/$name.log" && [ -f "$run/model.safetensors" ]; then
        echo "- PASS $name: $procs process(es), stopped at 6, resumed to 12; losses: $($PYTHON -c "
import sys
from trivit.engine.metrics import read_metrics
print([round(r['loss'], 4) for r in read_metrics(sys.argv[1])])" "$run")" >> "$REPORT"
    else
        echo "- FAIL $name: no resume from step 6 or no model.safetensors; see $name.log" >> "$REPORT"; FAILED=1
    fi
}
if [ "$GPUS" -ge 2 ]; then
    run_check ddp_nccl_bf16 2 engine.backend=ddp engine.precision=bf16
else
    run_check one_gpu_bf16 1 engine.precision=bf16
fi
run_check fsdp_bf16 2 engine.backend=fsdp engine.precision=bf16
run_check zero3_bf16 2 engine.backend=deepspeed engine.zero_stage=3 engine.precision=bf16
cat "$REPORT"
exit $FAILED
