#!/usr/bin/env bash
# One prepared check of PPAP on a CUDA machine (run from anywhere; it cds to the repository root):
#
#     bash tests/gpu_check.sh                 # results in $OUT (default ./gpu_out)
#     PYTHON=/path/to/python bash tests/gpu_check.sh
#
# Parts, in order, each with its own time limit inside an overall budget (GPU_CHECK_BUDGET_S, default 450 s,
# so the whole script ends well inside 8 minutes; parts that no longer fit are skipped and say so):
#   env        nvidia-smi, interpreter check; creates .venv and pip-installs the requirements when
#              .venv/bin/python cannot import torch (PIP_ARGS adds pip options, e.g. an --index-url)
#   build      JIT build of ext/ (CPU + CUDA libraries), MAX_JOBS=16, TORCH_CUDA_ARCH_LIST = this GPU
#   selfcheck  ext.self_check of both CUDA ops as a process sees them first, then under
#              torch.autocast (fp16, bf16) and with TF32 allowed (float32 matmul precision "high",
#              "medium"): each passed or its one-line error -> $OUT/selfcheck.json
#   tests      pytest tests -k "(cuda or gpu) and not shim" (the CUDA tests of tests/test_ext.py and
#              any other test named for CUDA; the CPU emulation of the kernels is left to the CPU
#              suite), under `timeout`
#   bench_ext  tests/bench_ext.py --json (CRF and top-k, CPU and CUDA)
#   bench      tests/benchmarks.py --device cuda: loss and training step at B=64, profile of ours' loss
#   bench_b8   tests/benchmarks.py --device cuda --only loss --loss-batch 8 (the CPU benchmark's shape)
#   bench_bf16 tests/benchmarks.py --device cuda --only step --amp-dtype bf16 (B=64)
#   cache      tests/benchmarks.py --device cuda --only cache: the step live vs --feature-cache (+ -crit), demo and
#              ViT-S/8 at B=64, and whether the cached rows equal the live trunk bitwise on this GPU
#   mem64      tests/benchmarks.py --device cuda --only mem64 (the loss at B=64: custom backward vs autograd)
#   loader     tests/benchmarks.py --only loader (five-crop JPEGs -> images/s with the default workers)
# GPU_CHECK_PARTS=bench,bench_b8 runs only those parts (env always runs).
# A failing part does not stop the others; each part's exit code goes into the report:
#   $OUT/gpu_report.txt   everything printed
#   $OUT/gpu_report.json  {parts: {name: {rc, seconds, limit_s, log}}, bench: ..., bench_ext: ..., ...}
# Exit code: 0 when every part passed, 1 otherwise.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/gpu_report.txt"
PARTS="$OUT/parts.tsv"
: > "$REPORT"
: > "$PARTS"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WANTED=${GPU_CHECK_PARTS:-build,selfcheck,tests,bench_ext,bench,cache,mem64,loader,bench_b8,bench_bf16}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1

log() { echo "$*" | tee -a "$REPORT"; }

# run_part NAME LIMIT_S COMMAND...: runs with `timeout`, limited to what is left of the budget.
run_part() {
    local name=$1 limit=$2; shift 2
    [[ ",$WANTED," == *",$name,"* ]] || return 0
    local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
    (( limit > left )) && limit=$left
    log ""
    log "==================== $name ($(date +%H:%M:%S), limit ${limit}s): $*"
    if (( limit < 20 )); then
        log "SKIPPED: only ${left}s of the ${BUDGET}s budget left"
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" >> "$PARTS"
        return
    fi
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$REPORT" "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    (( rc == 124 || rc == 137 )) && log "TIMED OUT after ${limit}s"
    log "---- $name: exit $rc in $(( $(date +%s) - t0 ))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$PARTS"
}

# ------------------------------------------------------------------------------------------- env
log "PPAP gpu_check | $(date '+%F %T') | repo $REPO | git $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
log "budget ${BUDGET}s, parts $WANTED, MAX_JOBS=$MAX_JOBS, OUT=$OUT"
nvidia-smi 2>&1 | tee -a "$REPORT"

py_ok() { "$1" -c "import torch, numpy, scipy, pytest, tqdm" >/dev/null 2>&1; }

setup_env() {
    if [[ -n "${PYTHON:-}" ]]; then
        PY=$PYTHON
        py_ok "$PY" || { echo "PYTHON=$PY cannot import torch/numpy/scipy/pytest/tqdm"; return 1; }
        return 0
    fi
    PY=$REPO/.venv/bin/python
    py_ok "$PY" && return 0
    # a GPU image usually has its own python3 with torch (and no network): use it when it has what we need
    if py_ok python3; then PY=$(command -v python3); return 0; fi
    echo "$PY is missing or incomplete: creating/filling .venv (pip ${PIP_ARGS:-})"
    local clear=""
    "$PY" -c pass >/dev/null 2>&1 || clear="--clear"
    ${BASE_PYTHON:-python3} -m venv $clear "$REPO/.venv" || return 1
    # shellcheck disable=SC2086
    "$PY" -m pip install ${PIP_ARGS:-} torch==2.14.1 torchvision==0.29.1 numpy scipy pybind11 ninja pytest tqdm \
        || return 1
    # shellcheck disable=SC2086
    "$PY" -m pip install ${PIP_ARGS:-} pydensecrf2 || echo "pydensecrf2 not installed: its comparisons are skipped"
    py_ok "$PY"
}
t0=$(date +%s)
setup_env 2>&1 | tee -a "$REPORT" "$OUT/env.log"
rc=${PIPESTATUS[0]}
if [[ -z "${PYTHON:-}" ]]; then
    PY=$REPO/.venv/bin/python
    py_ok "$PY" || PY=$(command -v python3)
else
    PY=$PYTHON
fi
printf '%s\t%s\t%s\t%s\n' "env" "$rc" "$(( $(date +%s) - t0 ))" "-" >> "$PARTS"
export PATH="$(dirname "$PY"):$PATH"       # ninja from the venv
"$PY" - <<'EOF' 2>&1 | tee -a "$REPORT"
import torch, sys
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    [[ -z "$cap" ]] && cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" \
                             2>/dev/null)
    [[ -n "$cap" ]] && export TORCH_CUDA_ARCH_LIST=$cap
fi
log "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}; nvcc: $(command -v nvcc || echo 'not on PATH')"

# ----------------------------------------------------------------------------------------- parts
run_part build 240 "$PY" -c "
import ext, torch
from ext import _build
ext.load()
print('loaded:', _build._loaded)
assert torch.cuda.is_available(), 'torch sees no GPU'
assert _build.CUDA_NAME in _build._loaded, 'CUDA library not built (nvcc not found?)'
"
run_part selfcheck 90 "$PY" -c "
import contextlib, json, sys, torch, ext
from ext import _selfcheck


@contextlib.contextmanager
def matmul_precision(precision):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


settings = {
    'plain': contextlib.nullcontext,
    'autocast_fp16': lambda: torch.autocast('cuda', dtype=torch.float16),
    'autocast_bf16': lambda: torch.autocast('cuda', dtype=torch.bfloat16),
    'tf32_high': lambda: matmul_precision('high'),
    'tf32_medium': lambda: matmul_precision('medium'),
}
results = {}
for name, setting in settings.items():
    for op in _selfcheck.OPS:
        try:
            with setting():
                found = ext.self_check(op, 'cuda')
            results[f'{op}/{name}'] = dict(passed=True, **found)
        except Exception as e:  # noqa: BLE001 - every outcome is reported
            results[f'{op}/{name}'] = dict(passed=False, error=type(e).__name__ + ': ' + ' '.join(str(e).split())[:400])
        print(f'{op:15s} {name:14s}', json.dumps(results[f'{op}/{name}']))
json.dump(results, open('$OUT/selfcheck.json', 'w'), indent=2)
sys.exit(0 if all(r['passed'] for r in results.values()) else 1)
"
run_part tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests -k "(cuda or gpu) and not shim"
run_part bench_ext 120 "$PY" tests/bench_ext.py --json "$OUT/bench_ext.json"
run_part bench 180 "$PY" tests/benchmarks.py --device cuda --loss-batch 64 --batch 64 --profile \
    --json "$OUT/bench.json"
run_part cache 150 "$PY" tests/benchmarks.py --device cuda --only cache --json "$OUT/cache.json"
run_part mem64 90 "$PY" tests/benchmarks.py --device cuda --only mem64 --json "$OUT/mem64.json"
run_part loader 90 "$PY" tests/benchmarks.py --only loader --loader-sources 400 --json "$OUT/loader.json"
run_part bench_b8 60 "$PY" tests/benchmarks.py --device cuda --only loss --loss-batch 8 --json "$OUT/bench_b8.json"
run_part bench_bf16 90 "$PY" tests/benchmarks.py --device cuda --only step --batch 64 --amp-dtype bf16 \
    --step-repeats 5 --json "$OUT/bench_bf16.json"

# ---------------------------------------------------------------------------------------- report
log ""
log "==================== summary (total $(( $(date +%s) - START ))s)"
column -t "$PARTS" 2>/dev/null | tee -a "$REPORT" || tee -a "$REPORT" < "$PARTS"
REPORT_PY=$PY
"$REPORT_PY" -c pass 2>/dev/null || REPORT_PY=python3
OUT="$OUT" START="$START" "$REPORT_PY" - <<'EOF' 2>&1 | tee -a "$REPORT"
import json, os, subprocess, time
out = os.environ["OUT"]


def command(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


report = {"time": time.strftime("%F %T"), "seconds": int(time.time()) - int(os.environ["START"]),
          "git": command("git", "rev-parse", "HEAD"), "git_status": command("git", "status", "--short"),
          "nvidia_smi": command("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                "--format=csv,noheader"),
          "parts": {}}
for line in open(os.path.join(out, "parts.tsv")):
    name, rc, secs, limit = line.rstrip("\n").split("\t")
    report["parts"][name] = {"rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(secs),
                             "limit_s": limit, "log": f"{name}.log"}
for key in ("selfcheck", "bench", "cache", "mem64", "loader", "bench_b8", "bench_bf16", "bench_ext"):
    path = os.path.join(out, key + ".json")
    if os.path.exists(path):
        try:
            report[key] = json.load(open(path))
        except ValueError as e:
            report[key] = {"error": f"unreadable {path}: {e}"}
report["all_passed"] = all(p["rc"] == 0 for p in report["parts"].values())
json.dump(report, open(os.path.join(out, "gpu_report.json"), "w"), indent=2)
print(f"wrote {out}/gpu_report.json and gpu_report.txt; all parts passed: {report['all_passed']}")
EOF
grep -qvP '\t0\t' "$PARTS" && exit 1
exit 0
