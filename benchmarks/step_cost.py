#!/usr/bin/env python
"""What an update of SAM/ASAM costs next to Adam's, through fairseq's own Trainer (the console
command `fairseq-asam-benchmark`; fairseq_asam_experiments/benchmark.py defines every column).

    python benchmarks/step_cost.py --preset iwslt --json benchmarks/results.json
    python benchmarks/step_cost.py --preset iwslt --device cuda --fp16 --update-freq 2
"""

import sys

from fairseq_asam_experiments.cli import benchmark_main

if __name__ == "__main__":
    sys.exit(benchmark_main())
