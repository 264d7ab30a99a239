#!/usr/bin/env python
"""Draws SGD, SAM and ASAM paths on L = 1/2 (1 - w1 w2)^2 to a PNG.

The console command `fairseq-asam-trajectories` does the same;
`fairseq-asam-trajectories --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.cli import trajectories_main

if __name__ == "__main__":
    sys.exit(trajectories_main())
