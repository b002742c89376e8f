#!/usr/bin/env bash
# Issue 16's device checks, prepared so that one short GPU session runs them (see tools/gpu_sweep.py).
#
#   OUT=/some/dir bash tools/device_session.sh tests        # env check + the `gpu`-marked tests   (~4 min)
#   OUT=/some/dir bash tools/device_session.sh sweep [S]    # the GPU sweep with a budget of S s (default 420)
#   OUT=/some/dir bash tools/device_session.sh all [S]      # both, in one call
#   SWEEP_ARGS=--smoke OUT=/tmp/x bash tools/device_session.sh all   # a rehearsal on the CPU (no device time)
#
# Run from the repository root on the GPU machine, with the machine's own python3 and torch (its image had torch
# 2.11; see visattn/layers/compat.py): the checkout is put on PYTHONPATH, and the wheels of .whl/ (timm at the
# tested version and the peers, made here by `python tools/fetch_device_wheels.py`, carried with `carry:
# [".whl"]`) are installed into /tmp/site when present. Everything lands under $OUT, at most two folders down
# and in at most eight files, which is what the device tool brings back: env.txt, gpu_tests.log, sweep.log,
# sweep/sweep.json, benchmarks-gpu.md and vs_dense_gpu.png (the page and its plot regenerated from the sweep).
# Each phase has its own timeout so that a hang in one still leaves the other's files, and the page is
# regenerated from whatever rows were saved.
set -uo pipefail
OUT=${OUT:-gpu_out}
PHASE=${1:-all}
BUDGET=${2:-420}
mkdir -p "$OUT/sweep"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH#"$PWD:"}"
fi

{
  date -u
  nvidia-smi -L
  python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
for mod in ("timm", "einops", "safetensors", "yaml", "hypothesis", "performer_pytorch", "product_key_memory"):
    try:
        print(mod, getattr(__import__(mod), "__version__", "present"))
    except Exception as err:  # the sweep and tests say which of them they need
        print(mod, "missing:", err)
import visattn
print("visattn", visattn.__file__, len(visattn.list_attns()), "blocks")
EOF
} 2>&1 | tee "$OUT/env.txt"

if [[ $PHASE == tests || $PHASE == all ]]; then
  # Flex gradient equivalence and pkm's bf16 path; recompile logs show whether the BlockMask cache holds.
  TORCH_LOGS=recompiles timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_sparse_flex.py tests/test_pkm_backends.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
fi

if [[ $PHASE == sweep || $PHASE == all ]]; then
  # shellcheck disable=SC2086  # SWEEP_ARGS: extra words, e.g. --smoke for a CPU rehearsal
  timeout $((BUDGET + 120)) python3 tools/gpu_sweep.py "$OUT/sweep" --budget "$BUDGET" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" | tail -40
  python3 tools/gpu_sweep.py --docs "$OUT/sweep" && cp docs/benchmarks-gpu.md "$OUT/benchmarks-gpu.md" \
    && { [ ! -f docs/img/vs_dense_gpu.png ] || cp docs/img/vs_dense_gpu.png "$OUT/"; }
fi
