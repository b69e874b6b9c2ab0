#!/usr/bin/env bash
# The GPU suite, one command on a lent GPU machine (no network there: it uses the torch, triton,
# pytest, nvcc and pybind11 that machine has):
#   1. builds sema in place (pip install --no-build-isolation --no-deps -e .), CUDA kernels included;
#   2. runs the CUDA tests (tests/test_cuda_ext.py tests/test_triton.py tests/test_switch_ema.py);
#   3. runs the bandwidth profiler over every parameter set and dtype pair (sema-bench);
#   4. runs the peer benchmark (bench/peers.py) over every set;
#   5. prints a short summary table last.
# Everything goes to bench/results/<device>-<date>/ and, when $OUT is set, to $OUT as well.
# A failed stage is reported and the next stage still runs; the exit status is 1 if any failed.
#
#   bash bench/gpu_suite.sh
#   PYTHON=python3.11 SUITE_QUICK=1 bash bench/gpu_suite.sh    # tiny sets, few repeats: a smoke run
#
# Knobs: PYTHON (default python3), SUITE_STAGES (default build,tests,profile,peers: a lent
# machine allows 10 minutes per command, so the stages can be split over two calls, e.g.
# SUITE_STAGES=build,tests then SUITE_STAGES=profile,peers; the summary always runs),
# SUITE_SKIP_BUILD=1 (the same as leaving build out of SUITE_STAGES), SUITE_QUICK=1, SUITE_SETS (default all), SUITE_DTYPES (default all), SUITE_PEER_SETS
# (default all), SUITE_REPEATS (default: the tools' own), SUITE_DEVICE (default cuda; cpu runs
# the same stages on the CPU, to check the script itself on a machine without a GPU).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEVICE="${SUITE_DEVICE:-cuda}"
STAGES="${SUITE_STAGES:-build,tests,profile,peers}"
if [ "${SUITE_SKIP_BUILD:-0}" = "1" ]; then STAGES="${STAGES//build/}"; fi
for stage in ${STAGES//,/ }; do
    case "$stage" in build | tests | profile | peers) ;; *) echo "gpu_suite: unknown stage '$stage' in SUITE_STAGES" >&2; exit 2 ;; esac
done
want() { [[ ",$STAGES," == *",$1,"* ]]; }
case "$DEVICE" in cuda | cuda:[0-9]* | cpu) ;; *) echo "gpu_suite: SUITE_DEVICE must be cuda[:N] or cpu, not '$DEVICE'" >&2; exit 2 ;; esac

say() { printf '\n=== %s ===\n' "$*"; }
die() { printf 'gpu_suite: %s\n' "$*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python"
"$PYTHON" - "$DEVICE" <<'EOF' || die "this suite needs torch with a CUDA device (see the message above)"
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"torch cannot be imported: {exc}")
if sys.argv[1].startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})")
EOF

device="$("$PYTHON" - "$DEVICE" <<'EOF'
import re, sys
from pathlib import Path
import torch
if sys.argv[1].startswith("cuda"):
    name = torch.cuda.get_device_name(torch.device(sys.argv[1]))
else:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((l.split(":", 1)[1] for l in lines if l.startswith("model name")), "cpu")
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
)"
stamp="$(date -u +%Y%m%d-%H%M%S)"
results="bench/results/${device}-${stamp%%-*}"
mkdir -p "$results"
echo "gpu_suite: results go to $results${OUT:+ and $OUT}"

failed=()
run_stage() {  # run_stage NAME LOGFILE COMMAND...: runs, tees the log, records a failure
    local name="$1" log="$2"
    shift 2
    say "$name: $*"
    local status=0
    "$@" 2>&1 | tee "$log" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "gpu_suite: $name FAILED (exit $status); log: $log" >&2
        failed+=("$name")
    fi
    return 0
}

{
    echo "date: $stamp (UTC)"
    echo "host cpus: $(nproc)"
    "$PYTHON" - <<'EOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import triton
    print("triton:", triton.__version__)
except ImportError as exc:
    print("triton: missing:", exc)
EOF
    if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
    git rev-parse HEAD 2>/dev/null | sed 's/^/git commit: /' || true
} >"$results/environment.txt" 2>&1
cat "$results/environment.txt"

if want build; then
    # The build needs no network: setuptools, wheel and pybind11 must already be there.
    run_stage build "$results/build.log" \
        "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e .
fi
"$PYTHON" -c 'import sys, sema; print(sema.available_backends(sys.argv[1]))' "$DEVICE" \
    | tee "$results/backends.txt" || failed+=("import sema")

if want tests; then
    run_stage tests "$results/pytest.log" \
        "$PYTHON" -m pytest -q -rs tests/test_cuda_ext.py tests/test_triton.py tests/test_switch_ema.py \
        --junitxml="$results/pytest-junit.xml"
fi

quick=()
repeats=()
sets="${SUITE_SETS:-all}"
peer_sets="${SUITE_PEER_SETS:-all}"
if [ "${SUITE_QUICK:-0}" = "1" ]; then
    sets="${SUITE_SETS:-tiny,many_small}"
    peer_sets="${SUITE_PEER_SETS:-tiny}"
    repeats=(--repeats 5)
    quick=(--quick)
fi
if [ -n "${SUITE_REPEATS:-}" ]; then repeats=(--repeats "$SUITE_REPEATS"); fi
plot=()
if "$PYTHON" -c 'import matplotlib' >/dev/null 2>&1; then
    plot=(--plot "$results/profile-${device}.png")
else
    echo "gpu_suite: matplotlib is not installed here: no PNG plots (the JSON and CSV files have everything)"
fi

if want profile; then
    run_stage profile "$results/profile.log" \
        "$PYTHON" -m sema.profile --set "$sets" --dtypes "${SUITE_DTYPES:-all}" --device "$DEVICE" --no-progress \
        ${repeats[@]+"${repeats[@]}"} ${plot[@]+"${plot[@]}"} \
        --json "$results/profile-${device}.json" --csv "$results/profile-${device}.csv"
fi

peer_plot=()
if [ ${#plot[@]} -gt 0 ]; then peer_plot=(--plot "$results/peers-${device}.png"); fi
if want peers; then
    run_stage peers "$results/peers.log" \
        "$PYTHON" bench/peers.py ${quick[@]+"${quick[@]}"} --sets "$peer_sets" --device "$DEVICE" --no-progress \
        ${repeats[@]+"${repeats[@]}"} ${peer_plot[@]+"${peer_plot[@]}"} \
        --json "$results/peers-${device}.json" --csv "$results/peers-${device}.csv"
fi

say "summary"
"$PYTHON" - "$results" "$device" <<'EOF' | tee "$results/summary.txt" || failed+=("summary")
import json, sys
from pathlib import Path

results, device = Path(sys.argv[1]), sys.argv[2]
profile_path, peers_path = results / f"profile-{device}.json", results / f"peers-{device}.json"
if profile_path.exists():
    rows = json.loads(profile_path.read_text())["rows"]
    print("SwitchEMA.update per set and dtype pair: the fastest backend, GB/s and % of a same-run copy_")
    print(f"{'set':11} {'param:ema':10} {'backend':8} {'ms':>9} {'GB/s':>8} {'% copy_':>8} {'host ms':>8}")
    keys = dict.fromkeys((r["param_set"], r["param_dtype"], r["ema_dtype"]) for r in rows)
    for set_name, p, e in keys:
        mine = [r for r in rows if (r["param_set"], r["param_dtype"], r["ema_dtype"]) == (set_name, p, e)
                and r["op"] == "SwitchEMA.update"]
        if mine:
            best = min(mine, key=lambda r: r["median_ms"])
            print(f"{set_name[:11]:11} {p + ':' + e:10} {best['backend']:8} {best['median_ms']:9.3f} "
                  f"{best['GB/s']:8.1f} {best['pct_of_copy']:7.0f}% {best['host_ms']:8.3f}")
else:
    print(f"no profile results ({profile_path} is missing)")
if peers_path.exists():
    rows = [r for r in json.loads(peers_path.read_text())["rows"] if "skipped" not in r]
    print("\nsema SwitchEMA.update (auto backend) speed-up over each peer (peer ms / sema ms)")
    peers = list(dict.fromkeys(r["peer"] for r in rows if not r["peer"].startswith("sema_")))
    keys = list(dict.fromkeys((r["param_set"], r["param_dtype"]) for r in rows))
    print(f"{'peer':24} " + " ".join(f"{s[:9] + '/' + d:>14}" for s, d in keys))
    for peer in peers:
        cells = []
        for s, d in keys:
            hit = [r for r in rows if (r["param_set"], r["param_dtype"], r["peer"]) == (s, d, peer)]
            cells.append(f"{hit[0]['sema_auto_speedup']:13.2f}x" if hit else f"{'-':>14}")
        print(f"{peer[:24]:24} " + " ".join(cells))
else:
    print(f"no peer results ({peers_path} is missing)")
EOF

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/$(basename "$results")"
    cp -r "$results/." "$OUT/$(basename "$results")/"
    echo "gpu_suite: copied $results to $OUT/$(basename "$results")"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_suite: FAILED stages: ${failed[*]} (logs in $results)" >&2
    exit 1
fi
echo "gpu_suite: all stages passed; results in $results"
