#!/usr/bin/env bash
# On a CUDA machine with the package's dependencies installed (torch, triton, transformers, peft, pytest,
# pytest-benchmark; matplotlib for the plots): run the GPU tests, then the whole benchmark suite, write the JSON and
# the Markdown report (+ PNG plots) into OUT_DIR, and print the report. About 10 minutes in all.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]          OUT_DIR defaults to benchmarks/results
#
# Environment: PYTHON (default python3); DYLORA_MOE_COMMIT names the commit where the copy has no .git; SKIP_TESTS=1 skips tests/; TEST_TIMEOUT / OPS_TIMEOUT / STEP_TIMEOUT
# (seconds, defaults 150 / 150 / 240) bound each phase so one that hangs cannot eat the others' time.
# Exit status: 0 when every phase passed, 1 when a phase failed or timed out (the report still covers what ran),
# 2 when the set-up is wrong (no CUDA, package not importable).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

die() { echo "run_gpu.sh: ERROR: $*" >&2; exit 2; }

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
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || die "no CUDA device visible to torch"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '| peft', peft.__version__)"

status=0
phase() {  # phase NAME TIMEOUT CMD...: run, report its status, remember a failure
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    if [ "$rc" -ne 0 ]; then status=1; fi
}

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # Tests check values, not speed: pin one kernel config instead of autotuning every test shape.
    DYLORA_MOE_AUTOTUNE=0 phase "tests (GPU)" "${TEST_TIMEOUT:-150}" "$PY" -m pytest tests/ -q -p no:cacheprovider -rfs
fi

stem=$("$PY" -c "import re, time, torch
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-') + time.strftime('-%Y-%m-%d', time.gmtime()))")
# Two sessions, two JSON files: a timeout in the model-level phase still leaves the op-level results.
phase "op benchmarks" "${OPS_TIMEOUT:-150}" "$PY" -m pytest benchmarks/test_ops.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$OUT/$stem-ops.json"
phase "step benchmarks" "${STEP_TIMEOUT:-240}" "$PY" -m pytest benchmarks/test_step.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$OUT/$stem-step.json"

jsons=()
for f in "$OUT/$stem-ops.json" "$OUT/$stem-step.json"; do
    [ -s "$f" ] && jsons+=("$f")
done
[ ${#jsons[@]} -gt 0 ] || die "no benchmark JSON was written (see the phases above)"
"$PY" benchmarks/report.py "${jsons[@]}" --out-dir "$OUT" || status=1
exit $status
