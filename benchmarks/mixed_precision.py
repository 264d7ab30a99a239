#!/usr/bin/env python
"""`fairseq-asam-precision` without the console script: how much of ε survives fp16/bf16 weights
and autocast (docs/mixed-precision.md).

    python benchmarks/mixed_precision.py --init --data-bin DATA_BIN --threads 1
"""

import sys

from fairseq_asam_experiments.precision import main

if __name__ == "__main__":
    sys.exit(main())
