#!/usr/bin/env bash
# GPU checks, run from the repository root with torch already installed (installs nothing):
#   1. the test suite without the slow end-to-end runs (CUDA and autocast tests run where a GPU is),
#   2. the step benchmark on CUDA: eager variants on every model, then the compiled ones and CUDA graphs
#      on the small models (each compile is cold), each run writing its own JSON,
#   3. the peak memory of a [784, 800, 800, 10]@4096 step on CUDA.
# The time limits add up to 530 s, under one device call's 600.
# Logs and JSON go to $OUT (default: a new temporary folder). DEVICE=cpu with tiny
# STEP_ARGS and COMPILED_ARGS (and RUN_TESTS=0) smoke-tests the script on a machine without a GPU. Exit status: 1 if any part failed.
set -u
OUT="${OUT:-$(mktemp -d)}"
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python3}"
STEP_ARGS="${STEP_ARGS:---models 784-30-10@10,784-100-10@64,784-800-800-10@4096 --variants nn,bp,fused,fused_cost,sgd_step --epoch-variants nn,fused_cost,sgd_step,sgd_epoch}"
COMPILED_ARGS="${COMPILED_ARGS:---models 784-30-10@10,784-100-10@64 --variants nn,nn+compile,fused_cost+compile,nn+graphs,fused_cost+graphs --no-epoch}"
MEMORY_ARGS="${MEMORY_ARGS:-}"
RUN_TESTS="${RUN_TESTS:-1}"
mkdir -p "$OUT"
status=0

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, note a failure and go on
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "$seconds" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n +2 "$OUT/$name.log" | tail -n 40  # (the log's first line is the one echoed above)
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.log"
[ "$RUN_TESTS" = 0 ] || run pytest 150 "$PYTHON" -m pytest tests -q -m "not slow" -x
# shellcheck disable=SC2086  # STEP_ARGS, COMPILED_ARGS and MEMORY_ARGS are word lists
run bench_step 90 "$PYTHON" -m benchmarks.step --device "$DEVICE" $STEP_ARGS --json "$OUT/bench_$DEVICE.json"
# shellcheck disable=SC2086
run bench_compiled 200 "$PYTHON" -m benchmarks.step --device "$DEVICE" $COMPILED_ARGS --json "$OUT/bench_compiled_$DEVICE.json"
# shellcheck disable=SC2086
run bench_memory 90 "$PYTHON" -m benchmarks.memory --device "$DEVICE" $MEMORY_ARGS --json "$OUT/memory_$DEVICE.json"
echo "logs in $OUT; exit $status"
exit $status
