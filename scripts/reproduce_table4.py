#!/usr/bin/env python
"""Reproduces Table 4 of the ASAM paper, from the IWSLT'14 archive to the report.

The console command `fairseq-asam-table4` does the same;
`fairseq-asam-table4 --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.cli import table4_main

if __name__ == "__main__":
    sys.exit(table4_main())
