#!/bin/bash
# The checks only a GPU machine can run, on ONE GPU, in at most BUDGET_S (540 s) of section budgets, as one report:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: gpu-check; report: OUT_DIR/REPORT.md)
# No set-up and no network: it runs with the python that holds torch there (PYTHON, default .venv/bin/python
# if present, else python3), and imports trivit from this checkout when it is not installed. Packages that
# machine lacks (webdataset and braceexpand for training, deepspeed and hjson for ZeRO-3) can travel as wheels:
# WHEELS=dir installs dir/*.whl into OUT_DIR/site first (pip download --no-deps ... -d dir, on a networked
# machine). A section whose package is missing says SKIP and why.
#  1. SDPA: the kernel a masked and an unmasked call get, what each kernel accepts, fwd+bwd ms (ViT-B, bf16).
#  2. flex_attention: the share of 128/64/32/16 tiles skipped at 139 and 785 tokens; compiled flex vs SDPA ms.
#  3. vit_large, all three levels, FSDP2 on one rank, with and without activation checkpointing (peak GiB,
#     ms/step), and a sharded checkpoint round trip.
#  4. Host syncs per training step by file:line (torch.cuda.set_sync_debug_mode).
#  5. ZeRO-3 at engine.precision auto and bf16 (torchrun, one process): 6 steps, stopped, resumed to 12.
#  6. Compiled bf16 deit_base, tokens 0.7 and all three levels, against compiled timm dense, batch 128.
#  7. data.decode_on=device: img/s of nvJPEG decoding and the painted augmentation (on what the budget has left).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT"
export OUT
REPORT="$OUT/REPORT.md"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" "$WHEELS"/*.whl \
        && export PYTHONPATH="$PWD/$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $PYTHON -c "import trivit.engine" 2> /dev/null; then  # this checkout as the package, as setup.py maps it
    mkdir -p "$OUT/pkg/trivit"
    for item in trivit/*.py; do ln -sf "$PWD/$item" "$OUT/pkg/trivit/"; done
    for sub in engine sparse datasets; do ln -sfn "$PWD/$sub" "$OUT/pkg/trivit/$sub"; done
    export PYTHONPATH="$PWD/$OUT/pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
has() { $PYTHON -c "import $1" 2> /dev/null; }
{
    echo "# trivit GPU check, $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PYTHON -c "
import importlib.util, torch, timm
def version(name):
    return importlib.import_module(name).__version__ if importlib.util.find_spec(name) else 'not installed'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'capability', torch.cuda.get_device_capability(),
      'timm', timm.__version__, 'deepspeed', version('deepspeed'), 'webdataset', version('webdataset'))"
    echo '```'
} > "$REPORT"
FAILED=0
START=$(date +%s)
BUDGET=${BUDGET_S:-540}

set -m  # each background job its own process group: a section over its limit is stopped whole
limited() {  # limit, command or shell function...: stopped (with its children) after limit seconds; 124 then
    local limit=$1; shift
    "$@" &
    local job=$!
    ( sleep "$limit"; kill -TERM -- -"$job" 2> /dev/null ) &
    local watchdog=$!
    disown "$watchdog"  # no job-status line when it is stopped
    wait "$job"
    local code=$?
    if kill -0 -- -"$watchdog" 2> /dev/null; then kill -- -"$watchdog" 2> /dev/null; else code=124; fi
    return $code
}

section() {  # title, limit, command...: run the command under its limit (cut to what the budget has left)
    local title=$1 limit=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    [ "$limit" -gt "$left" ] && limit=$left
    echo -e "\n## $title" >> "$REPORT"
    if [ "$limit" -lt 15 ]; then echo "- SKIP: the time budget is spent" >> "$REPORT"; return; fi
    local log="$OUT/$(echo "$title" | tr -c 'a-zA-Z0-9\n' '_' | cut -c1-40).log"
    limited "$limit" "$@" >> "$REPORT" 2> "$log"
    local code=$?
    [ $code = 0 ] && return
    FAILED=1
    [ $code = 124 ] && echo "- FAIL: not finished within ${limit} s (see $log)" >> "$REPORT" \
        || echo "- FAIL: exit code $code (see $log)" >> "$REPORT"
}

section "1. SDPA kernels, masked and unmasked" 40 $PYTHON benchmarks/gpu_check.py kernels
section "2. flex_attention tiles skipped, and flex against SDPA" 80 $PYTHON benchmarks/gpu_check.py flex
skip() { echo -e "\n## $1\n\n- SKIP: $2 is not installed (WHEELS=...; see the top of this script)" >> "$REPORT"; }
if has webdataset; then  # trivit.engine reads shards through it
    section "3. vit_large, all three levels, FSDP2 on one rank" 100 $PYTHON benchmarks/gpu_check.py fsdp
    section "4. Host syncs per training step" 60 $PYTHON benchmarks/gpu_check.py syncs
else
    skip "3. vit_large, all three levels, FSDP2 on one rank" webdataset
    skip "4. Host syncs per training step" webdataset
fi

# 5. ZeRO-3 through the real command, at precision auto (what torchrun without a JSON resolves) and bf16.
SHARDS="$OUT/shards"
COMMON=(data.train_urls="$SHARDS" data.val_urls="$SHARDS" data.batch_size=32 data.eval_batch_size=64
        data.num_workers=2 data.mean=[0.3] data.std=[0.3] data.auto_augment=null model.img_size=32
        model.patch_size=4 model.in_chans=1 "model.timm_kwargs={embed_dim: 192, depth: 4, num_heads: 3}"
        optim.ema_decay=null schedule.epochs=2 schedule.warmup_epochs=0 checkpoint.every_steps=6
        logging.every_steps=1 logging.progress_bar=false sparsity.tokens.keep_rate=0.7
        sparsity.attention.keep_rate=0.2 sparsity.schedule.start_epochs=0 sparsity.schedule.span_epochs=0.5
        sparsity.examples.policy=forgetting sparsity.examples.refresh_every_epochs=1
        engine.backend=deepspeed engine.zero_stage=3)
zero3() {  # precision: 6 steps, then resumed to 12; prints one line
    local precision=$1 run="$OUT/zero3_$1"
    for steps in 6 12; do
        $PYTHON -m torch.distributed.run --nproc-per-node 1 -m trivit train run_dir="$run" "${COMMON[@]}" \
            engine.precision="$precision" schedule.max_steps=$steps >> "$OUT/zero3_$precision.log" 2>&1 \
            || { echo "- FAIL ZeRO-3 precision $precision (steps $steps): see zero3_$precision.log"; return 1; }
    done
    if grep -q "resumed from .*step_00000006" "$OUT/zero3_$precision.log" && [ -f "$run/model.safetensors" ]; then
        echo "- PASS ZeRO-3 precision $precision (resolved $(grep -m1 -o 'precision: [a-z0-9]*' "$run/config.yaml")): stopped at 6, resumed to 12; losses: $($PYTHON -c "
import sys
from trivit.engine.metrics import read_metrics
print([round(r['loss'], 4) for r in read_metrics(sys.argv[1]) if 'loss' in r])" "$run")"
    else
        echo "- FAIL ZeRO-3 precision $precision: no resume from step 6 or no model.safetensors; see zero3_$precision.log"
        return 1
    fi
}
zero3_both() {
    $PYTHON - "$SHARDS" <<'PYEOF' || return 1
import sys
from pathlib import Path
from tests.conftest import NUM_CLASSES, synthetic_samples
from trivit.datasets.shards import write_index, write_split
folder = Path(sys.argv[1])
splits = {"train": write_split(synthetic_samples(512, size=32), folder, "train", 32),
          "val": write_split(synthetic_samples(128, size=32, seed=1), folder, "val", 32)}
write_index(folder, splits, [f"class{i}" for i in range(NUM_CLASSES)])
PYEOF
    zero3 auto && zero3 bf16
}
if has deepspeed && has webdataset; then
    section "5. ZeRO-3 at precision auto and bf16, stopped and resumed" 140 zero3_both
else
    skip "5. ZeRO-3 at precision auto and bf16, stopped and resumed" "deepspeed or webdataset"
fi

bench_compiled() {
    $PYTHON -m trivit bench speed --models deit_base_patch16_224 --batch 128 --precision bf16 --compile on \
        --variants tokens0.7 all3 --repeats 3 --steps 3 --warmup 2 --out "$OUT/bench-compiled" --overwrite \
        > "$OUT/bench-compiled.log" 2>&1 && cat "$OUT/bench-compiled/speed.md"
}
if has webdataset; then
    section "6. Compiled bf16 deit_base at batch 128: tokens 0.7 and all three against compiled timm dense" 120 \
        bench_compiled
else
    skip "6. Compiled bf16 deit_base at batch 128" webdataset
fi

if has webdataset; then  # last: it runs on what the budget has left
    section "7. data.decode_on=device: nvJPEG decode and the painted DeiT augmentation, img/s" 30 \
        $PYTHON benchmarks/data_throughput.py --device cuda --only device
else
    skip "7. data.decode_on=device" webdataset
fi

echo -e "\nSection budgets used: $(( $(date +%s) - START )) s of $BUDGET s." >> "$REPORT"
cat "$REPORT"
exit $FAILED
