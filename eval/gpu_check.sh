#!/usr/bin/env bash
# The prepared GPU check (issue 17): the anchor (our fast path vs the official DiT recipe at DiT-L/2, 32x32x4, batch
# 32: images/s, MFU, memory, DTR and ANT-UW / vanilla), a 200-step dtr.py DiT-L/2 + DTR bf16 + compile smoke on
# random latents, DDPM-250 cfg sampling, TaskDiffusion ViT-L 512 px, torchrun on 2 GPUs if present. One table,
# printed and written to results/gpu_check.md; under 8 minutes on one H100/H200, no downloads.
#   eval/gpu_check.sh                 # on the GPU machine
#   eval/gpu_check.sh --tiny          # the same code at toy shapes on CPU (under a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m eval.bench --gpu-check "$@"
