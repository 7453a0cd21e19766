#!/usr/bin/env bash
# CUDA checks and GPU benchmarks on a machine with an NVIDIA GPU and a python3 that has torch.
# Packages missing there can be carried as wheels in .whl/ (pydantic, faiss-cpu, gguf, diffusers).
# Usage: bash evals/bench/run_gpu.sh tests|lego|static|routing|all   (results under $OUT or out/gpu)
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1  # never import the source tree: the installed package maps cli/, algorithms/
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/mkl . >/dev/null \
  && export PYTHONPATH=/tmp/mkl:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

phase=${1:-all}
run() { [ "$phase" = all ] || [ "$phase" = "$1" ]; }
if run tests; then
  # the whole suite with CUDA visible: device=auto paths run on the GPU, CUDA-only tests un-skip
  python3 -m pytest tests -q -p no:cacheprovider -k "not hub" 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
fi
if run lego; then
  python3 evals/bench/lego_bench.py --layers 32 --mem-layers 8 --backends torch --device cuda --out "$OUT/RESULTS-lego-gpu.md"
  CUDA_VISIBLE_DEVICES= python3 evals/bench/lego_bench.py --layers 32 --mem-layers 8 --backends torch,faiss,sklearn \
    --device cpu --out "$OUT/RESULTS-lego-cpu16.md"
fi
if run static; then
  python3 evals/bench/static_bench.py --device cuda --layers 8 --hidden 2048 --threads 16 \
    --workdir /tmp/bench-static --results "$OUT/RESULTS-static-gpu.md"
fi
if run routing; then
  python3 evals/bench/routing_bench.py --device cuda --out "$OUT/RESULTS-routing-gpu.md"
fi
