#!/usr/bin/env bash
# GPU smoke test (issue 16): everything the CUDA path needs checked, in one device call of at
# most 8 minutes. Run from the repository root of a copy of the working tree on the lent GPU
# machine (docs/cuda.md, "GPU smoke test"):
#
#   here, once:  bench/gpu_wheelhouse.sh          # pydantic, zarr and their needs -> .whl/
#   device run:  command "bench/gpu_smoke.sh", carry [".whl"], timeout_s 540
#
# Steps (each independent step runs whatever happened before it; a table at the end):
#   env       nvidia-smi; python, torch, CUDA, the GPU, one kernel checked     (fatal: exit 3)
#   deps      install the carried wheels this python lacks into $SITE; import
#             the pipeline's modules                                           (fatal: exit 4)
#   pytest    D3S_REQUIRE_GPU=1 pytest -q -m gpu -x over the files with gpu tests (fail, not skip)
#   pipeline  a tiny synthetic run on CUDA, every stage, 2 synthesis batches (ISU mix), labels,
#             validation; time and peak GPU memory per stage; then the CLI over it
#   bench_*   bench/bench_synthesis_gpu.py at the paper's setting (batch 200, 224 px),
#             $SMOKE_ITERS iterations: fp32; bf16 + channels_last; the same + torch.compile
#   sync      host-device syncs per synthesis iteration (torch.cuda.set_sync_debug_mode)
#   throughput  bench/bench_throughput.py on the GPU: `d3s plan`'s table for cuda runs, written
#             to $OUT/cuda.json and into the package (tasks/plan/throughput/cuda.json) here;
#             copy $OUT/cuda.json there in the checkout and commit it (docs/plan.md)
# Files in $OUT (8 at most come back): smoke.log, env.json, pipeline.json, cuda.json,
# bench_fp32.json, bench_bf16_cl.json, bench_bf16_cl_compile.json, sync.json (pytest's result
# is in smoke.log and the summary).
# Exit status: 0 all passed, 1 a step failed, 3 no usable CUDA, 4 the project cannot import.
#
# Settings (environment): OUT (default /tmp/d3s-gpu-smoke), PYTHON (default: the first of
# python3, /opt/torch/.venv/bin/python3 that imports torch), WHEELHOUSE (.whl), SITE
# (/tmp/d3s-site), SMOKE_BUDGET_S (450: every step's timeout is cut to what is left of it),
# SMOKE_ITERS (200), SMOKE_DEVICE (cuda; "cpu" runs the steps on the CPU, for trying the
# script without a GPU: env and pytest then fail, as they should).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-/tmp/d3s-gpu-smoke}
SITE=${SITE:-/tmp/d3s-site}
WHEELHOUSE=${WHEELHOUSE:-.whl}
BUDGET_S=${SMOKE_BUDGET_S:-450}
ITERS=${SMOKE_ITERS:-200}
DEVICE=${SMOKE_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
NAMES=()
RESULTS=()
TIMES=()

record() { # name result seconds
    NAMES+=("$1")
    RESULTS+=("$2")
    TIMES+=("$3")
}

# step NAME CAP_SECONDS COMMAND...: run under timeout min(CAP, time left), record the result.
step() {
    local name=$1 cap=$2
    shift 2
    local now left limit t0 rc
    now=$(date +%s)
    left=$((DEADLINE - now - 5))
    echo
    echo "=== [$name] $(date -u +%H:%M:%S) +$((now - START)) s: $* ==="
    if ((left < 20)); then
        echo "[$name] SKIPPED: ${left} s left of the ${BUDGET_S} s budget"
        record "$name" "SKIP (no time)" 0
        return 1
    fi
    limit=$((cap < left ? cap : left))
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then # a function of this script: in a child bash
        export -f "$1"
        timeout -k 10 "$limit" bash -c '"$@"' _ "$@"
    else
        timeout -k 10 "$limit" "$@"
    fi
    rc=$?
    local took=$(($(date +%s) - t0))
    if ((rc == 0)); then
        record "$name" PASS "$took"
    elif ((rc == 124 || rc == 137)); then
        echo "[$name] TIMEOUT after ${limit} s"
        record "$name" "TIMEOUT (${limit} s)" "$took"
    else
        echo "[$name] FAILED (exit $rc)"
        record "$name" "FAIL (exit $rc)" "$took"
    fi
    return "$rc"
}

env_check() { # nvidia-smi, then python, torch and one CUDA kernel checked
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
            --format=csv || true
        nvidia-smi || true
    else
        echo "nvidia-smi: not on the PATH"
    fi
    if [ "$DEVICE" = cuda ]; then
        "$PY" bench/gpu_env.py cuda --json "$OUT/env.json"
    else
        "$PY" bench/gpu_env.py cuda --json "$OUT/env.json" || true
    fi
}

deps() { # the carried wheels this python lacks, then the imports
    if [ -d "$WHEELHOUSE" ]; then
        local wanted
        wanted=$("$PY" bench/gpu_env.py wheels "$WHEELHOUSE") || return 1
        if [ -n "$wanted" ]; then
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$SITE" $wanted || return 1
        fi
    else
        echo "no wheelhouse at $WHEELHOUSE (bench/gpu_wheelhouse.sh makes it; carry it)"
    fi
    "$PY" bench/gpu_env.py imports
}

throughput_table() { # the GPU table, then `d3s plan` of an ImageNet-21K run reading it
    "$PY" bench/bench_throughput.py --device cuda --out "$OUT/cuda.json" || return 1
    cp "$OUT/cuda.json" tasks/plan/throughput/cuda.json || return 1
    cat >/tmp/d3s-smoke-in21k.json <<'EOF'
{"name": "in21k", "preset": "imagenet-21k", "device": "cuda",
 "dataset": {"kind": "imagefolder", "path": "/nonexistent/in21k/train"},
 "teachers": {"count": 5}, "synthesis": {"ipc": 10, "batch_size": 200},
 "validation": {"students": 3, "random_real_baseline": true}}
EOF
    "$PY" -m flows.cli plan /tmp/d3s-smoke-in21k.json --no-data |
        grep -E '^(plan for|teachers|synthesis|total|hours:)'
}

summary() {
    echo
    echo "=== summary: $(($(date +%s) - START)) s of the ${BUDGET_S} s budget ==="
    if [ -n "${PY:-}" ]; then
        "$PY" - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception:
        return None


env = load("env.json")
if env:
    print(f"device: {env.get('device_name', '-')}, torch {env.get('torch')} "
          f"(CUDA {env.get('torch_cuda')}), python {env.get('python')}")
p = load("pipeline.json")
if p:
    print(f"pipeline: {'ok' if p.get('ok') else 'FAILED'}, synthesis batches "
          f"{p.get('synthesis_batches_committed')} of 2")
    for r in p.get("stages", []):
        if r.get("ok"):
            print(f"  {r['stage']:<11} {r['seconds']:7.1f} s  peak "
                  f"{r.get('peak_allocated_mib', float('nan')):8.1f} MiB allocated, "
                  f"{r.get('peak_reserved_mib', float('nan')):8.1f} MiB reserved")
        else:
            print(f"  {r['stage']:<11} FAILED {r.get('error', '')[:200]}")
s = load("sync.json")
if s and s.get("counted"):
    print(f"sync: {s['syncs_per_iteration']:.1f} host-device syncs per iteration "
          f"({s['syncs']} in {s['iterations_counted']}), {s['syncs_finish_batch']} in finish_batch")
paper = 170.0
for name in ("bench_fp32", "bench_bf16_cl", "bench_bf16_cl_compile"):
    b = load(name + ".json")
    if b:
        print(f"{name:<22} {b['seconds_per_1000_iterations']:7.1f} s/1000 it "
              f"({b['iterations']} it, {b['seconds']:.1f} s) = "
              f"{b['seconds_per_1000_iterations'] / paper:.2f}x the paper's {paper:.0f} s; peak "
              f"{b.get('peak_allocated_mib') or float('nan'):.0f} MiB allocated, "
              f"{b.get('peak_reserved_mib') or float('nan'):.0f} reserved (paper 9851)"
              + ("" if b.get("paper_setting") else " [not the paper's setting]"))
EOF
    fi
    echo
    printf '%-24s %-22s %8s\n' step result seconds
    local i failed=0
    for i in "${!NAMES[@]}"; do
        printf '%-24s %-22s %8s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
        [ "${RESULTS[$i]}" = PASS ] || failed=1
    done
    return "$failed"
}

main() {
    echo "gpu_smoke.sh: repo $REPO, out $OUT, budget ${BUDGET_S} s, bench iterations $ITERS," \
        "device $DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    git -C "$REPO" log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git here)"
    git -C "$REPO" status --short 2>/dev/null | head -20

    # -- env: fatal when CUDA is not usable ------------------------------------------------
    PY=${PYTHON:-}
    if [ -z "$PY" ]; then
        for c in python3 /opt/torch/.venv/bin/python3 python; do
            if command -v "$c" >/dev/null && "$c" -c 'import torch' 2>/dev/null; then
                PY=$(command -v "$c")
                break
            fi
        done
    fi
    if [ -z "$PY" ]; then
        echo "FATAL: no python here imports torch (tried python3, /opt/torch/.venv/bin/python3)"
        record env "FAIL (no torch)" 0
        summary
        return 3
    fi
    echo "python: $PY"
    export PY OUT SITE WHEELHOUSE DEVICE
    if ! step env 60 env_check; then
        echo "FATAL: CUDA is not usable here (see above); nothing else can run on the GPU"
        summary
        return 3
    fi

    # -- deps: the carried wheels this python lacks ------------------------------------------
    if ! step deps 60 deps; then
        echo "FATAL: the project's modules do not import with $PY; carry the wheelhouse:" \
            "run bench/gpu_wheelhouse.sh here and name .whl in the device call's carry"
        summary
        return 4
    fi

    # -- pytest -m gpu: fail, not skip -------------------------------------------------------
    local files
    files=$(grep -l -E 'mark\.gpu' tests/test_*.py | grep -v test_gpu_gating.py | tr '\n' ' ')
    echo "gpu test files: ${files:-none}"
    if [ -n "$files" ]; then
        # shellcheck disable=SC2086
        step pytest 150 env D3S_REQUIRE_GPU=1 "$PY" -m pytest -q -m gpu -x -p no:cacheprovider \
            $files
    else
        record pytest "FAIL (no gpu tests)" 0
    fi

    # -- a tiny whole pipeline on CUDA ------------------------------------------------------
    rm -rf /tmp/d3s-smoke-run /tmp/d3s-smoke-run-config.json
    step pipeline 180 "$PY" bench/gpu_pipeline.py /tmp/d3s-smoke-run --device "$DEVICE" \
        --json "$OUT/pipeline.json"

    # -- the synthesis bench at the paper's setting -----------------------------------------
    local size=224 batch=200
    if [ "$DEVICE" != cuda ]; then size=32 batch=4; fi # the CPU trial: tiny
    local bench=("$PY" bench/bench_synthesis_gpu.py --device "$DEVICE" --batch "$batch"
        --size "$size" --iterations "$ITERS")
    step bench_fp32 120 "${bench[@]}" --json "$OUT/bench_fp32.json"
    step bench_bf16_cl 100 "${bench[@]}" --autocast bf16 --channels-last \
        --json "$OUT/bench_bf16_cl.json"

    # -- host-device syncs per iteration ----------------------------------------------------
    if [ "$DEVICE" = cuda ]; then
        step sync 90 "$PY" bench/gpu_sync_check.py --json "$OUT/sync.json"
    else
        step sync 90 "$PY" bench/gpu_sync_check.py --device cpu --batch 4 --size 32 \
            --iterations 2 --json "$OUT/sync.json"
    fi

    # -- d3s plan's throughput table for this device ------------------------------------------
    if [ "$DEVICE" = cuda ]; then
        step throughput 150 throughput_table
    else # the CPU trial: one small point, into $OUT only (the package's cpu.json stays)
        step throughput 120 "$PY" bench/bench_throughput.py --device cpu \
            --points small_resnet-w16-28px --out "$OUT/cpu.json"
    fi

    # -- last, as it may take longest (compilation) -----------------------------------------
    if [ "$DEVICE" = cuda ]; then
        step bench_bf16_cl_compile 240 "${bench[@]}" --autocast bf16 --channels-last --compile \
            --json "$OUT/bench_bf16_cl_compile.json"
    else
        record bench_bf16_cl_compile "SKIP (cpu trial)" 0
    fi

    summary
}

main "$@" 2>&1 | tee "$OUT/smoke.log"
exit "${PIPESTATUS[0]}"
