#!/usr/bin/env bash
# GPU-only checks, each against the reference update (tests/gpu_check.py): fairseq's flat --fp16,
# bf16, CUDA AMP, and data parallel over every GPU (NCCL) with a dummy batch on one rank.
# One line per check; exit 1 if one fails.  Under 10 minutes.  Usage: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
timeout 600 python tests/gpu_check.py "$@"
