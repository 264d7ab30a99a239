#!/usr/bin/env python
"""Sharpness and adaptive sharpness of a fairseq checkpoint on its data.

The console command `fairseq-asam-sharpness` does the same;
`fairseq-asam-sharpness --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.sharpness import main

if __name__ == "__main__":
    sys.exit(main())
