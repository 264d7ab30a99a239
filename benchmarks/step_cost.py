#!/usr/bin/env python
"""`fairseq-asam-benchmark` without the console script: what an update of SAM/ASAM costs next to
Adam's (docs/cost.md).

    python benchmarks/step_cost.py --preset iwslt --json results.json
"""

import sys

from fairseq_asam_experiments.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
