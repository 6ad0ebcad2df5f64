#!/usr/bin/env bash
# On a CUDA machine with the package's dependencies (torch, triton, transformers, peft, pytest, pytest-benchmark;
# matplotlib for the plots): the WHOLE test suite, then the op and model-level benchmarks, then the report, all into
# one output folder.
#
#   bash benchmarks/run_gpu.sh [PHASE ...]      PHASE: tests | ops | step | report (default: all four, in order)
#   bash benchmarks/run_gpu.sh quick            the first GPU minutes, at most 8 minutes (docs/gpu-check.md)
#
# quick runs five parts, ordered by value, each under its own limit (seconds): check (CHECK_TIMEOUT, 100:
# benchmarks/gpu_check.py, every Triton kernel compiles, runs and matches eager in bf16 and bf16 x with fp32 A/B ->
# check.json, check.md), ops (QUICK_OPS_TIMEOUT, 100: fwd+bwd at T=8192, d=4096, E=8, r=16, k=2 and E=64 against
# eager, grouped_mm, loop, one LoRA and the frozen base), step (QUICK_STEP_TIMEOUT, 100: one training step per
# backend, peft and the frozen base), report (QUICK_REPORT_TIMEOUT, 70: report.md with the roofline and compile
# numbers of the configs that ran), graphs (GRAPHS_TIMEOUT, 90: the Triton step under torch.compile
# mode="reduce-overhead"; the report is redrawn when it measured), then quick.md: the device, commit, each part's
# exit status and time, the check and the report. 460 s of limits, under 8 minutes with the set-up.
#
# Output folder OUT_DIR (default benchmarks/out/<gpu>-<UTC date>, untracked): run.log (everything printed, appended
# by every call), tests.xml (junit), ops.json + step.json (pytest-benchmark), all_benchmark_data.csv (the rows,
# benchmarks/records.py), report.md (ending with roofline.md: each Triton op's measured kernel time beside the cost
# model's roofline time and the registers / spills / shared memory of the configs it launched, compiled for this
# GPU's architecture by benchmarks/roofline.py) and plots/. Phases called separately with the same OUT_DIR share one run id, so
# a machine that limits each command (10 minutes on a lent one) runs one phase per command:
#   OUT_DIR=benchmarks/out/gpu bash benchmarks/run_gpu.sh tests
#   OUT_DIR=benchmarks/out/gpu bash benchmarks/run_gpu.sh ops step report
# Each phase has its own time limit, under 10 minutes: TESTS_TIMEOUT / OPS_TIMEOUT / STEP_TIMEOUT / REPORT_TIMEOUT
# (seconds; defaults 540 / 240 / 420 / 120); a phase that hangs cannot eat the others' time.
# To keep the rows: `python benchmarks/records.py merge OUT_DIR/all_benchmark_data.csv` appends them to the committed
# benchmarks/data/all_benchmark_data.csv (UPDATE_RESULTS=1 does it here at the end of the report phase).
# Environment: PYTHON (default python3); DYLORA_MOE_COMMIT names the commit where the copy has no .git; ALLOW_CPU=1
# runs on a machine without CUDA (a rehearsal of the pipeline, or the CPU figures: there tests/ need TRITON_INTERPRET=1).
# Exit status: 0 when every phase passed, 1 when a phase failed or timed out (the report still covers what ran),
# 2 when the set-up is wrong (no CUDA, package not importable, unknown phase).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

die() { echo "run_gpu.sh: ERROR: $*" >&2; exit 2; }

PHASES=("$@")
[ ${#PHASES[@]} -gt 0 ] || PHASES=(tests ops step report)
QUICK=0
if [ "${PHASES[*]}" = quick ]; then
    QUICK=1
    PHASES=(check ops step report graphs)
    export BENCH_QUICK=1
fi
for p in "${PHASES[@]}"; do
    case "$p" in tests | ops | step | report | check | graphs) ;;
    *) die "unknown phase '$p' (expected quick alone, or tests, ops, step, report)" ;; esac
done

if [ "${ALLOW_CPU:-0}" != 1 ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || die "no CUDA device visible to torch"
fi
slug=$("$PY" -c "import re, time, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print(re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') + time.strftime('-%Y-%m-%d', time.gmtime()))")
OUT="${OUT_DIR:-benchmarks/out/$slug}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

# From the repo root, dylora_moe.kernels imports through the dylora_moe/kernels -> ../kernels link; installs map
# kernels/ there in pyproject.toml. If neither gives this checkout, install it (editable, no dependency changes).
this_checkout() {
    "$PY" - <<'EOF' 2>"${IMPORT_LOG:-/dev/null}"
import os, dylora_moe, dylora_moe.kernels, dylora_moe.model
assert os.path.samefile(os.path.dirname(dylora_moe.__file__), "dylora_moe"), dylora_moe.__file__
assert os.path.samefile(os.path.dirname(dylora_moe.kernels.__file__), "kernels"), dylora_moe.kernels.__file__
EOF
}
if ! this_checkout; then
    echo "== installing this checkout: pip install --no-deps --no-build-isolation -e ."
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || "$PY" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e . \
        || die "pip could not install this checkout (editable); install it by hand, then rerun"
    IMPORT_LOG=/dev/stderr this_checkout \
        || die "dylora_moe / dylora_moe.kernels do not import from this checkout after pip install -e . (see above)"
fi
echo "== $(date -u +%FT%TZ) phases: ${PHASES[*]}; output: $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '| peft', peft.__version__)"

# One run id for every phase of this output folder: the report compares rows of one run.
[ -s "$OUT/run_id" ] || date -u +%FT%TZ >"$OUT/run_id"
export BENCH_RUN_ID
BENCH_RUN_ID="$(cat "$OUT/run_id")"

status=0
phase() {  # phase NAME TIMEOUT CMD...: run, report its status, remember a failure (and its line in phases.md)
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    echo "| $name | $limit | $((SECONDS - start)) | $rc$([ "$rc" = 124 ] && echo ' (time limit)') |" >>"$OUT/phases.md"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

# Test files that have never run on a GPU go first (the H100 run of d577555 reached only these, in this order,
# before its time limit); files added since are new to the GPU too, so they also run early.
RAN_ON_GPU=(test_bench_report.py test_checkpoint.py test_data.py test_inject.py test_layer.py test_model.py)
ordered_tests() {
    local f name seen
    for f in tests/test_*.py tests/*/test_*.py; do
        name=$(basename "$f")
        seen=0
        for r in "${RAN_ON_GPU[@]}"; do [ "$r" = "$name" ] && seen=1; done
        [ $seen = 0 ] && echo "$f"
    done
    for r in "${RAN_ON_GPU[@]}"; do for f in tests/"$r" tests/*/"$r"; do [ -f "$f" ] && echo "$f"; done; done
}

bench() {  # bench NAME FILE TIMEOUT [PYTEST ARGS...]
    local name=$1 file=$2 limit=$3
    shift 3
    phase "$name benchmarks" "$limit" "$PY" -m pytest "$file" --benchmark-only -q -p no:cacheprovider -rs \
        --benchmark-json="$OUT/$name.json" --bench-csv="$OUT/all_benchmark_data.csv" "$@"
}
[ -s "$OUT/phases.md" ] || printf '| part | limit s | took s | exit |\n|---|---:|---:|---|\n' >"$OUT/phases.md"

for p in "${PHASES[@]}"; do
    case "$p" in
    tests)
        mapfile -t files < <(ordered_tests)
        # Tests check values, not speed: deterministic mode pins the kernel configs and the weight-gradient splits.
        DYLORA_MOE_DETERMINISTIC=1 phase "tests (GPU)" "${TESTS_TIMEOUT:-540}" "$PY" -m pytest "${files[@]}" -q \
            -p no:cacheprovider -rfs --durations=15 --junitxml="$OUT/tests.xml"
        ;;
    check)
        limit=${CHECK_TIMEOUT:-100}
        phase check "$limit" "$PY" benchmarks/gpu_check.py --out "$OUT" --budget $((limit * 3 / 4))
        ;;
    ops) if [ $QUICK = 1 ]; then
        bench ops benchmarks/test_ops.py "${QUICK_OPS_TIMEOUT:-100}" -k test_moe_lora
    else bench ops benchmarks/test_ops.py "${OPS_TIMEOUT:-240}"; fi ;;
    step) if [ $QUICK = 1 ]; then
        bench step benchmarks/test_step.py "${QUICK_STEP_TIMEOUT:-100}" -k "not compiled and not cudagraphs"
    else bench step benchmarks/test_step.py "${STEP_TIMEOUT:-420}"; fi ;;
    graphs)
        bench graphs benchmarks/test_step.py "${GRAPHS_TIMEOUT:-90}" -k cudagraphs
        if grep -q "triton+cudagraphs" "$OUT/all_benchmark_data.csv" 2>/dev/null && [ -s "$OUT/report.md" ]; then
            phase "report again" 30 "$PY" benchmarks/report.py --data "$OUT/all_benchmark_data.csv" \
                --run "$BENCH_RUN_ID" --out "$OUT/report.md" >/dev/null
            [ -s "$OUT/roofline.md" ] && { echo; cat "$OUT/roofline.md"; } >>"$OUT/report.md"
        fi
        ;;
    report)
        if [ -s "$OUT/all_benchmark_data.csv" ]; then
            limit=${REPORT_TIMEOUT:-120}
            plots=(--plots "$OUT/plots")
            [ $QUICK = 1 ] && limit=${QUICK_REPORT_TIMEOUT:-70} && plots=()
            phase report "$limit" "$PY" benchmarks/report.py --data "$OUT/all_benchmark_data.csv" \
                --run "$BENCH_RUN_ID" --out "$OUT/report.md" "${plots[@]}"
            # Without CUDA (ALLOW_CPU rehearsal) the roofline reads the limits of ROOFLINE_TARGET (default sm_90)
            # and, having no Triton rows, the eager ones (the pipeline rehearsed, not a measurement).
            target=()
            "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
                || target=(--target "${ROOFLINE_TARGET:-sm_90}" --provider eager)
            phase roofline "$limit" env -u TRITON_INTERPRET "$PY" benchmarks/roofline.py \
                --data "$OUT/all_benchmark_data.csv" --run "$BENCH_RUN_ID" --out "$OUT/roofline.md" "${target[@]}"
            if [ -s "$OUT/roofline.md" ] && [ -s "$OUT/report.md" ]; then
                { echo; cat "$OUT/roofline.md"; } >>"$OUT/report.md"
            fi
            if [ "${UPDATE_RESULTS:-0}" = 1 ]; then
                phase "update benchmarks/data" 60 "$PY" benchmarks/records.py merge "$OUT/all_benchmark_data.csv"
            fi
        else
            echo "== report: no rows in $OUT/all_benchmark_data.csv (run the ops / step phases first)"
            status=1
        fi
        ;;
    esac
done
if [ $QUICK = 1 ]; then
    {
        echo "# Quick GPU check: $("$PY" -c "import torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU rehearsal (no CUDA)')")"
        echo
        echo "commit $("$PY" -c 'from dylora_moe.provenance import commit; print(commit())'); run $BENCH_RUN_ID;" \
            "$(date -u +%FT%TZ); files in $OUT:" $(cd "$OUT" && ls -- *.json *.csv *.md 2>/dev/null)
        echo
        cat "$OUT/phases.md"
        for f in check.md report.md; do [ -s "$OUT/$f" ] && { echo; sed 's/^# /## /' "$OUT/$f"; }; done
    } >"$OUT/quick.md"
    echo "== quick: summary in $OUT/quick.md"
fi
exit $status
