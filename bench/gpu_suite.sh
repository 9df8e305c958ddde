#!/usr/bin/env bash
# Every GPU check of the filter in one session (issue 21), sized for <= 8 minutes on an
# H100/H200 (the steps' limits add up to 7.5 minutes): the gpu-marked tests, bench.gpu_bench (agreement with the CPU, the default
# configuration's throughput, FaceNet bf16) and bench.service_bench on the device.
#
#   OUT=/some/dir bench/gpu_suite.sh           # on the lent GPU
#   OUT=/tmp/smoke bench/gpu_suite.sh --smoke  # tiny sizes on a CPU machine: checks the script
#
# Needs models/ (what `make setup` fetches) and, where the machine's python lacks them,
# the wheels in .whl/ (bench/gpu_preflight.py lists them; it installs only what is missing,
# into .gpu/site). Writes under $OUT: gpu-<card>-<date>.jsonl (the benchmarks' JSON lines),
# gpu-tests.log / .xml, service-<device>.jsonl, nvidia-smi.txt and gpu-suite.json (which
# step passed, failed or timed out, and how long each took). Every step runs even if an
# earlier one failed; the exit status is 1 if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export FACEGATE_MODELS_DIR="$PWD/models"
export PYTHONPATH="$PWD:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (at most ${limit}s): $*" >&2
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local status=passed
    if ((rc == 124 || rc == 137)); then status=timed_out; elif ((rc != 0)); then status=failed; fi
    echo "=== $name: $status (rc $rc, $((SECONDS - start))s)" >&2
}

if ((SMOKE)); then
    step preflight 120 "$PY" -m bench.gpu_preflight --cpu
    export FACEGATE_GPU_TESTS_ON_CPU=1 FACEGATE_GPU_TEST_IMAGES=16
    # tests/unit/test_index.py's gpu test names "cuda" itself: on the GPU only.
    step gpu-tests 900 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        tests/models/test_gpu_agreement.py tests/models/test_mtcnn_batched.py --junitxml="$OUT/gpu-tests.xml" -o junit_family=xunit2
    step gpu-bench 900 "$PY" -m bench.gpu_bench --smoke --out-dir "$OUT"
    step service-bench 600 bash -c "'$PY' -m bench.service_bench --device cpu --smoke | tee '$OUT/service-cpu.jsonl'"
else
    command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    step preflight 30 "$PY" -m bench.gpu_preflight
    # Checks first (tolerances in tests/models/test_gpu_agreement.py), then the figures.
    step gpu-tests 130 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        tests/models/test_gpu_agreement.py tests/unit/test_index.py tests/models/test_mtcnn_batched.py \
        --junitxml="$OUT/gpu-tests.xml" -o junit_family=xunit2
    step gpu-bench 170 "$PY" -m bench.gpu_bench --out-dir "$OUT" \
        --sections agreement,default,facenet
    step service-bench 120 bash -c "'$PY' -m bench.service_bench --device cuda --seconds 10 | tee '$OUT/service-cuda.jsonl'"
fi 2>&1 | tee "$OUT/gpu-tests.log"

# The steps ran in a pipeline's subshell (tee): read their statuses back from the log.
"$PY" - "$OUT/gpu-tests.log" "$OUT/gpu-suite.json" <<'EOF'
import json, re, sys
log, out = sys.argv[1], sys.argv[2]
steps = [
    {"step": m[1], "status": m[2], "rc": int(m[3]), "seconds": int(m[4])}
    for m in re.finditer(r"^=== (\S+): (\w+) \(rc (\d+), (\d+)s\)$", open(log).read(), re.M)
]
json.dump({"steps": steps}, open(out, "w"), indent=1)
print(json.dumps({"gpu_suite": steps}))
sys.exit(0 if steps and all(s["status"] == "passed" for s in steps) else 1)
EOF
