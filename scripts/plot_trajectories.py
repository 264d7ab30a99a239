#!/usr/bin/env python
"""`fairseq-asam-trajectories` without the console script: SGD, SAM and ASAM paths on
L = 1/2 (1 - w1 w2)^2, drawn to a PNG (docs/tools.md)."""

import sys

from fairseq_asam_experiments.trajectories import main

if __name__ == "__main__":
    sys.exit(main())
