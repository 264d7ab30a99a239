#!/usr/bin/env bash
# GPU-only checks (flat --fp16, bf16, fairseq's DDP wrapper over NCCL), each against the
# reference update; under 5 minutes on one GPU.  Usage: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 300 python scripts/gpu_check.py
