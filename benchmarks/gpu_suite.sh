#!/usr/bin/env bash
# The CUDA measurements behind docs/performance.md, in one go (about 9 minutes on an H100):
#     bash benchmarks/gpu_suite.sh OUT_DIR
# Each memory_speed.py call rewrites its JSON after every row and starts no new row after its
# --budget-s, so a run that is cut short keeps what it measured.
set -u
out=$(mkdir -p "${1:-.}" && cd "${1:-.}" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
cd "$here"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py memory_speed.py --models resnet50,resnet152 --precisions bf16,fp32 \
    --budget-s 240 --json "$out/cuda_resnet.json"
$py memory_speed.py --models resnet101,resnet200,vit_base_patch16_224,convnext_base \
    --methods plain,timm-ckpt,revify --precisions bf16 --budget-s 150 --json "$out/cuda_more.json"
$py memory_speed.py --models resnet50 --methods plain,timm-ckpt,revify --precisions bf16 \
    --cuda-batches 256 --budget-s 60 --json "$out/cuda_b256.json"
# torch.compile of the whole model and regional compile (revify.compile_units), ~3 minutes
$py compile_step.py --models resnet50 --device cuda --precision bf16 --size 224 --batch 64 \
    --json "$out/cuda_compile.json"
