#!/usr/bin/env bash
# FSDP2 + NCCL check of distil's distributed training (benchmarks/gpu_fsdp_check.py): one process per GPU under
# torchrun. CI is CPU-only and never runs this. Usage, from the repository root:
#   bash benchmarks/gpu_fsdp_check.sh [OUT_DIR]          (NGPU=2 to use two GPUs; DEVICE=cpu for a gloo dry run)
# Needs torch with CUDA, transformers, pydantic, safetensors, rich, PyYAML and numpy; exits 3 naming what is missing.
# Prints one PASS/FAIL line per check and writes OUT_DIR/gpu_fsdp_check.json and OUT_DIR/log.txt.
set -uo pipefail
OUT=${1:-${OUT:-gpu-check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ['torch', 'transformers', 'pydantic', 'safetensors', 'rich', 'yaml', 'numpy'] if u.find_spec(m) is None))")
if [ -n "$missing" ]; then echo "missing Python packages: $missing (carry them as wheels)"; exit 3; fi
if [ "${DEVICE:-cuda}" = cuda ]; then
  NGPU=${NGPU:-1}
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= $NGPU else 1)" \
    || { echo "needs $NGPU CUDA device(s)"; exit 3; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout "${CHECK_TIMEOUT:-480}" $PY -m torch.distributed.run --standalone --nproc_per_node "${NGPU:-1}" \
  benchmarks/gpu_fsdp_check.py "$OUT" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
