"""How much of the SAM/ASAM perturbation ε survives fp16/bf16 weights and autocast.

    python benchmarks/mixed_precision.py --init --data-bin data-bin/iwslt14.tokenized.de-en
    python benchmarks/mixed_precision.py --checkpoint ckpt/last.pt --data-bin DATA --batches 3

For SAM (ρ 0.1) and ASAM (ρ 0.2, η 0.01) × weights fp32/fp16/bf16 × rounding (nearest,
stochastic and its controls) and × autocast fp16/bf16: the fraction of ε's non-zero entries
lost, cosine and relative L2 error against ε, and the loss increase obtained.  Every definition
is in fairseq_asam_experiments/precision.py.  The console command `fairseq-asam-precision`
does the same.
"""

import sys

from fairseq_asam_experiments.cli import precision_main

if __name__ == "__main__":
    sys.exit(precision_main())
