#!/usr/bin/env python
"""Kendall τ and ψ of sharpness, adaptive sharpness and the parameter norm against the
generalization gap over a family of trained models (docs/correlation.md).

The console command `fairseq-asam-correlation` does the same;
`fairseq-asam-correlation --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.correlation import main

if __name__ == "__main__":
    sys.exit(main())
