#!/usr/bin/env python
"""Prepares IWSLT'14 German-English for fairseq, as prepare-iwslt14.sh does.

The console command `fairseq-asam-prepare` does the same;
`fairseq-asam-prepare --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.prepare import main

if __name__ == "__main__":
    sys.exit(main())
