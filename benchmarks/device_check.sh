#!/usr/bin/env bash
# One call on a machine with a GPU (the `device` tool): the GPU benchmarks, then the whole test
# suite, where `--device auto` now picks the GPU. Results go to $OUT (else benchmarks/_out).
# Run it here first with QUICK=1 (small sizes, any machine). The device has torch with CUDA,
# typer, rich, safetensors and pytest, but no project install and possibly no hypothesis.
set -u
out=${OUT:-benchmarks/_out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>&1 || true
python benchmarks/gpu.py ${QUICK:+--quick} > "$out/gpu.txt" 2>&1
echo "gpu.py exit $?" >> "$out/gpu.txt"
ignore=()
python -c "import hypothesis" 2>/dev/null \
  || ignore=(--ignore=tests/test_literal.py --ignore=tests/test_metrics.py)
python -m pytest -q -p no:cacheprovider -rfEs "${ignore[@]}" > "$out/pytest.txt" 2>&1
echo "pytest exit $?" >> "$out/pytest.txt"
for f in "$out/gpu.txt" "$out/pytest.txt"; do tail -n 3 "$f"; done
