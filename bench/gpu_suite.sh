#!/usr/bin/env bash
# sema's GPU suite: one command on a lent GPU machine (one H200, no network, at most 10 minutes a
# command, results back only through $OUT, at most 8 files) that always returns its evidence.
#
#   bash bench/gpu_suite.sh                                          # on the GPU machine
#   SUITE_DEVICE=cpu OUT=$(mktemp -d) bash bench/gpu_suite.sh        # check the script on a CPU machine
#   SUITE_DEVICE=cpu SUITE_QUICK=1 OUT=$(mktemp -d) bash bench/gpu_suite.sh   # the same, in about a minute
#
# Stages, most evidence first, each under `timeout --kill-after`; limits in seconds (H200 estimate):
#   env 45 (10), build 180 (45-60: nvcc for sm_90 only), backends 45 (8), t-cuda 120 (30),
#   t-triton 150 (40), t-graphs 90 (20), t-offload 90 (30), big 90 (20: 2**31+17 elements),
#   profile 150 (60), profile-torch 60 (20), offload 120 (60: a 1.1B decoder's training step),
#   ncu 120 (45), memcheck 150 (60), peers 120 (40; last, if time remains).
# The whole run stays inside SUITE_BUDGET seconds (500 on cuda): a stage gets the smaller of its
# limit and the time left, and is skipped when that is under half its limit. A stage that fails
# or is killed is recorded (exit status, seconds, 'KILLED by time limit') and the next one runs.
#
# $OUT, rewritten as each stage ends (8 files at most): summary.txt (one line per stage, then the
# bandwidth, peer and offload tables; printed last), run.log (every stage's output), env.txt,
# profile.json, peers.json, ncu.txt, memcheck.txt, extras.tar.gz (JUnit XML, CSV, plots, the
# torch-backend profile, offload.json). Without OUT they go to bench/results/gpu-suite-<device>-<UTC stamp>/.
#
# Knobs: PYTHON (default python3; .venv/bin/python in cpu mode when present), SUITE_DEVICE=cuda|cpu,
# SUITE_QUICK=1 (cpu mode: pytest stages only collect, no build, smallest sets), SUITE_STAGES
# (comma separated, default all), SUITE_BUDGET, SUITE_LIMIT_SCALE (multiplies every limit, e.g.
# 0.5), SUITE_LIMITS (stage=seconds,... overrides), SUITE_KILL_AFTER (seconds from TERM to KILL,
# default 10), SUITE_HANG=stage[:stubborn] (the stage hangs instead, ignoring TERM if stubborn: proves
# the kill path), SUITE_CUDA_ARCHS (default 90), SUITE_XDIST (pytest-xdist workers, default 4 on
# cuda when installed), SUITE_COMMIT (the commit, for env.txt: the GPU machine's copy has no .git).
set -uo pipefail
case "${OUT:-}" in "" | /*) ;; *) OUT="$PWD/$OUT" ;; esac # relative to where it was called from
cd "$(dirname "$0")/.." || exit 2

STAGES=(env build backends t-cuda t-triton t-graphs t-offload big profile profile-torch offload ncu memcheck peers)
declare -A LIMIT=(
    [env]=45 [build]=180 [backends]=45 [t-cuda]=120 [t-triton]=150 [t-graphs]=90 [t-offload]=90 [big]=90
    [profile]=150 [profile-torch]=60 [offload]=120 [ncu]=120 [memcheck]=150 [peers]=120
)

die() {
    echo "gpu_suite: $*" >&2
    exit 2
}
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

DEVICE="${SUITE_DEVICE:-cuda}"
case "$DEVICE" in cuda | cpu) ;; *) die "SUITE_DEVICE must be cuda or cpu, not '$DEVICE'" ;; esac
QUICK="${SUITE_QUICK:-0}"
[ "$DEVICE" = cuda ] && [ "$QUICK" = 1 ] && die "SUITE_QUICK=1 is for SUITE_DEVICE=cpu (a check of the script)"
if [ "$DEVICE" = cuda ]; then BUDGET="${SUITE_BUDGET:-500}"; else BUDGET="${SUITE_BUDGET:-3600}"; fi
KILL_AFTER="${SUITE_KILL_AFTER:-10}"
SCALE="${SUITE_LIMIT_SCALE:-1}"
ARCHS="${SUITE_CUDA_ARCHS:-90}"
RESERVE=15 # seconds kept for the tables and the last copy to $OUT
is_uint "$BUDGET" || die "SUITE_BUDGET must be whole seconds, not '$BUDGET'"
is_uint "$KILL_AFTER" || die "SUITE_KILL_AFTER must be whole seconds, not '$KILL_AFTER'"
[[ "$SCALE" =~ ^[0-9]*\.?[0-9]+$ ]] || die "SUITE_LIMIT_SCALE must be a positive number, not '$SCALE'"

IFS=, read -ra overrides <<<"${SUITE_LIMITS:-}"
for pair in "${overrides[@]}"; do
    name="${pair%%=*}" seconds="${pair#*=}"
    [ -n "${LIMIT[$name]:-}" ] || die "SUITE_LIMITS: unknown stage '$name' (stages: ${STAGES[*]})"
    is_uint "$seconds" && [ "$seconds" -gt 0 ] || die "SUITE_LIMITS: '$pair' needs whole seconds > 0"
    LIMIT[$name]="$seconds"
done
for name in "${!LIMIT[@]}"; do # scaled once, rounded up, at least 1 s
    LIMIT[$name]=$(awk -v l="${LIMIT[$name]}" -v s="$SCALE" 'BEGIN { v = int(l * s + 0.999); print (v < 1 ? 1 : v) }')
done
IFS=, read -ra wanted <<<"${SUITE_STAGES:-$(IFS=, && echo "${STAGES[*]}")}"
for name in "${wanted[@]}"; do
    [ -n "${LIMIT[$name]:-}" ] || die "SUITE_STAGES: unknown stage '$name' (stages: ${STAGES[*]})"
done
HANG="${SUITE_HANG:-}"
HANG_STAGE="${HANG%%:*}"
if [ -n "$HANG" ]; then
    [ -n "${LIMIT[$HANG_STAGE]:-}" ] || die "SUITE_HANG: unknown stage '$HANG_STAGE'"
    [ "$HANG" = "$HANG_STAGE" ] || [ "$HANG" = "$HANG_STAGE:stubborn" ] || die "SUITE_HANG: stage or stage:stubborn"
fi

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then
    PY="$PWD/.venv/bin/python"
else
    PY=python3
fi
command -v "$PY" >/dev/null 2>&1 || die "no '$PY'; set PYTHON=/path/to/python"

STAMP="$(date -u +%Y%m%d-%H%M%S)"
SUITE_COMMIT="${SUITE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export SUITE_COMMIT
OUT="${OUT:-bench/results/gpu-suite-$DEVICE-$STAMP}"
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sema-gpu-suite.XXXXXX")" || die "mktemp failed"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/extras"
RUNLOG="$OUT/run.log"
SUMMARY="$OUT/summary.txt"

# The Triton interpreter only where there is no GPU; sema runs from this checkout.
if [ "$DEVICE" = cuda ]; then export TRITON_INTERPRET=0; else export TRITON_INTERPRET=1; fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
selected() { [[ " ${wanted[*]} " == *" $1 "* ]]; }

T0=$SECONDS
failed=()
{
    echo "sema GPU suite, device=$DEVICE$([ "$QUICK" = 1 ] && echo ' (quick)'), $STAMP UTC, commit $SUITE_COMMIT, python $PY"
    echo "budget ${BUDGET}s, kill ${KILL_AFTER}s after TERM; stage, exit status, seconds taken (limit):"
} | tee "$SUMMARY" >"$RUNLOG"

record() { # record LINE: one summary line, as the stage ends
    echo "$1" >>"$SUMMARY"
    echo "$1" >>"$RUNLOG"
    echo "gpu_suite: $1"
}

publish() { # copy what exists to $OUT and rewrite the archive of the rest (at most 8 files there)
    local file
    for file in env.txt profile.json peers.json ncu.txt memcheck.txt; do
        if [ -s "$WORK/$file" ]; then cp -f "$WORK/$file" "$OUT/$file"; fi
    done
    if compgen -G "$WORK/extras/*" >/dev/null; then
        tar -czf "$WORK/extras.tar.gz" -C "$WORK" extras && mv -f "$WORK/extras.tar.gz" "$OUT/extras.tar.gz"
    fi
}

stage() { # stage NAME NOTE COMMAND...: COMMAND under the stage's limit, output to run.log, one summary line
    local name="$1" note="$2"
    shift 2
    if ! selected "$name"; then
        record "$(printf '%-13s skipped: not in SUITE_STAGES' "$name")"
        return 0
    fi
    local limit="${LIMIT[$name]}" left=$((BUDGET - (SECONDS - T0) - KILL_AFTER - RESERVE))
    if [ "$left" -lt $(((limit + 1) / 2)) ]; then
        record "$(printf '%-13s skipped: %ss left of the %ss budget, limit %ss' "$name" "$((left < 0 ? 0 : left))" "$BUDGET" "$limit")"
        publish
        return 0
    fi
    if [ "$left" -lt "$limit" ]; then
        limit="$left"
        note="${note:+$note; }limit cut to the time left"
    fi
    if [ "$name" = "$HANG_STAGE" ]; then
        note="${note:+$note; }SUITE_HANG: a hang instead of the stage"
        if [ "$HANG" = "$HANG_STAGE:stubborn" ]; then set -- bash -c 'trap "" TERM; sleep 100000'; else set -- sleep 100000; fi
    fi
    printf '\n===== %s (limit %ss, t+%ss): %s\n' "$name" "$limit" "$((SECONDS - T0))" "$*" >>"$RUNLOG"
    echo "gpu_suite: $name started (limit ${limit}s)"
    local start=$SECONDS rc=0
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" >>"$RUNLOG" 2>&1 </dev/null || rc=$?
    local took=$((SECONDS - start)) status
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$took" -ge "$limit" ]; then
        status="KILLED by time limit"
        failed+=("$name")
    elif [ "$rc" -ne 0 ]; then
        status="FAILED"
        failed+=("$name")
    else
        status="ok"
    fi
    record "$(printf '%-13s exit %-3s %4ss (limit %ss) %s%s' "$name" "$rc" "$took" "$limit" "$status" "${note:+; $note}")"
    publish
}

skip() { # skip NAME REASON: a stage that cannot run here
    if selected "$1"; then record "$(printf '%-13s skipped: %s' "$1" "$2")"; else stage "$1" ""; fi
}

# 1. facts that decide how to read the rest
stage env "" "$PY" bench/gpu/env_facts.py --copy "$WORK/env.txt"

# 2. the build, CUDA kernels required (SEMA_BUILD_CUDA=1: a failed nvcc fails the stage)
BUILD_ENV=(env SEMA_BUILD_CUDA=1 SEMA_CUDA_ARCHS="$ARCHS" MAX_JOBS="$(nproc)")
if [ "$DEVICE" = cuda ]; then
    stage build "sm $ARCHS" "${BUILD_ENV[@]}" bash bench/gpu/build_in_place.sh "$PY"
elif [ "$QUICK" = 1 ]; then
    skip build "SUITE_QUICK=1 (the build takes minutes on a small CPU machine)"
else # out of tree: the in-place sema/_C of a shared checkout stays as it is
    stage build "cpu: out-of-tree build_ext, sm $ARCHS" "${BUILD_ENV[@]}" "$PY" setup.py build_ext \
        --build-lib "$WORK/build/lib" --build-temp "$WORK/build/temp"
fi
stage backends "" "$PY" bench/gpu/backends.py "$DEVICE"

# 3. correctness: one pytest process per backend (a sticky CUDA error cannot spread), per-test
# timeout, fail limit
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=5)
if has_module pytest_timeout; then PYTEST+=(--timeout=60); fi
XDIST="${SUITE_XDIST:-$([ "$DEVICE" = cuda ] && echo 4 || echo 0)}"
is_uint "$XDIST" || die "SUITE_XDIST must be a whole number, not '$XDIST'"
PARALLEL=()
if [ "$XDIST" -gt 0 ] && has_module xdist; then PARALLEL=(-n "$XDIST"); fi
if [ "$QUICK" = 1 ]; then PYTEST+=(--collect-only); fi
# The update table at three sizes (the tail paths, the vector body, 2**20 + 3); the sm_80 cubin
# check only when sm_80 is built.
CUDA_SELECT="not test_update_matches or n17 or n4097 or n1048579"
if [[ ";$ARCHS;" != *";80"* ]]; then CUDA_SELECT="($CUDA_SELECT) and not sm80_and_sm90"; fi
QUICK_NOTE=""
if [ "$QUICK" = 1 ]; then QUICK_NOTE="collect only (SUITE_QUICK=1)"; fi
stage t-cuda "$QUICK_NOTE" "${PYTEST[@]}" "${PARALLEL[@]}" --junitxml="$WORK/extras/t-cuda.xml" \
    tests/test_cuda_ext.py -k "$CUDA_SELECT"
stage t-triton "$QUICK_NOTE" "${PYTEST[@]}" "${PARALLEL[@]}" --junitxml="$WORK/extras/t-triton.xml" tests/test_triton.py
# The CUDA-graph capture tests wherever they live, by name (-k would also match a file name)
mapfile -t GRAPH_TESTS < <(grep -oE 'def test_[a-z0-9_]*(cuda_graph|captur)[a-z0-9_]*' tests/test_*.py | sed 's/:def /::/')
if [ "${#GRAPH_TESTS[@]}" -eq 0 ]; then
    skip t-graphs "no test named *cuda_graph* or *captur* in tests/"
else
    stage t-graphs "$QUICK_NOTE" "${PYTEST[@]}" --junitxml="$WORK/extras/t-graphs.xml" "${GRAPH_TESTS[@]}"
fi
# Offload and overlap on the GPU: one process, no xdist (some tests time the GPU with events)
stage t-offload "$QUICK_NOTE" "${PYTEST[@]}" --junitxml="$WORK/extras/t-offload.xml" tests/test_offload_cuda.py
if [ "$DEVICE" = cuda ]; then
    stage big "" "$PY" bench/gpu/big_bucket.py --backends triton,cuda
else
    stage big "cpu: n=2**20+17 on torch,cpp (2**31+17 on triton,cuda on the GPU)" \
        "$PY" bench/gpu/big_bucket.py --device cpu --n 1048593 --backends torch,cpp
fi

# 4. bandwidth
PLOT=()
PEERS_PLOT=()
if has_module matplotlib; then
    PLOT=(--plot "$WORK/extras/profile.png")
    PEERS_PLOT=(--plot "$WORK/extras/peers.png")
fi
if [ "$DEVICE" = cuda ]; then
    stage profile "" "$PY" -m sema.profile --set resnet50,gpt2_124m,decoder_1b --dtypes fp32,bf16,bf16:bf16 \
        --backends triton,cuda --repeats 50 --no-progress --json "$WORK/profile.json" \
        --csv "$WORK/extras/profile.csv" "${PLOT[@]}"
    stage profile-torch "" "$PY" -m sema.profile --set gpt2_124m --dtypes fp32,bf16 --backends torch \
        --repeats 30 --no-progress --json "$WORK/extras/profile-torch.json"
else
    PROFILE_SET=resnet50
    if [ "$QUICK" = 1 ]; then PROFILE_SET=tiny; fi
    stage profile "cpu: $PROFILE_SET on torch,cpp" "$PY" -m sema.profile --set "$PROFILE_SET" --dtypes fp32,bf16 \
        --backends torch,cpp --repeats 3 --no-progress --json "$WORK/profile.json" --csv "$WORK/extras/profile.csv"
    stage profile-torch "cpu: tiny" "$PY" -m sema.profile --set tiny --dtypes fp32 --backends torch --repeats 3 \
        --no-progress --json "$WORK/extras/profile-torch.json"
fi
# The EMA off the critical path: a training step without EMA, plain, overlap=True, offload
# (update_every 1, 4, 16), step time and GPU bytes; its JSON is rewritten after each configuration
OFFLOAD_OUT=(--json "$WORK/extras/offload.json" --text "$WORK/offload.txt")
if [ "$DEVICE" = cuda ]; then
    stage offload "" "$PY" bench/offload.py --parts train "${OFFLOAD_OUT[@]}"
elif [ "$QUICK" = 1 ]; then
    stage offload "cpu: a tiny decoder (a check of the script)" "$PY" bench/offload.py --quick --parts train \
        "${OFFLOAD_OUT[@]}"
else
    stage offload "cpu: --quick, every part" "$PY" bench/offload.py --quick "${OFFLOAD_OUT[@]}"
fi

# 5. why: hardware counters on one launch of each kernel family
NCU_KERNELS='regex:ema|switch|swap' # sema's kernel names; the target launches nothing else that matches
if [ "$DEVICE" = cpu ]; then
    stage ncu "cpu: the target alone (ncu needs a GPU)" \
        "$PY" bench/gpu/ncu_target.py --device cpu --backends torch,cpp --n 4099
elif ! command -v ncu >/dev/null 2>&1; then
    skip ncu "ncu is not on PATH"
else
    stage ncu "" ncu --clock-control none --kernel-name "$NCU_KERNELS" --launch-count 20 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --log-file "$WORK/ncu.txt" \
        "$PY" bench/gpu/ncu_target.py --backends triton,cuda
fi

# 6. out-of-bounds hunt in the CUDA extension
MEMCHECK_QUICK=()
if [ "$QUICK" = 1 ]; then MEMCHECK_QUICK=(--quick); fi
if [ "$DEVICE" = cpu ]; then
    stage memcheck "cpu: the target alone on cpp (compute-sanitizer needs a GPU)" \
        "$PY" bench/gpu/memcheck_target.py --device cpu --backend cpp "${MEMCHECK_QUICK[@]}"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    skip memcheck "compute-sanitizer is not on PATH"
else
    stage memcheck "" compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
        --log-file "$WORK/memcheck.txt" \
        "$PY" bench/gpu/memcheck_target.py --backend cuda
    if [ -s "$WORK/memcheck.txt" ]; then
        record "              $(grep -h 'ERROR SUMMARY' "$WORK/memcheck.txt" | tail -n 1)"
    fi
fi

# 7. peers, last
if [ "$DEVICE" = cuda ]; then
    stage peers "" "$PY" bench/peers.py --sets resnet50,gpt2_124m --dtypes fp32,bf16 --repeats 20 --no-progress \
        --json "$WORK/peers.json" --csv "$WORK/extras/peers.csv" "${PEERS_PLOT[@]}"
else
    stage peers "cpu: --quick" "$PY" bench/peers.py --quick --no-progress --json "$WORK/peers.json"
fi

{
    echo "total $((SECONDS - T0))s of the ${BUDGET}s budget; ${#failed[@]} stage(s) failed${failed[*]:+: ${failed[*]}}"
    echo
    timeout --kill-after=2 "$RESERVE" "$PY" bench/gpu/summary.py --profile "$WORK/profile.json" \
        "$WORK/extras/profile-torch.json" --peers "$WORK/peers.json" 2>&1 || echo "(the tables failed: see run.log)"
    if [ -s "$WORK/offload.txt" ]; then
        echo
        cat "$WORK/offload.txt"
    fi
} >>"$SUMMARY"
publish
printf '\n===== summary (%s) =====\n' "$OUT"
cat "$SUMMARY"
[ "${#failed[@]}" -eq 0 ]
