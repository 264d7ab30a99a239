#!/usr/bin/env python
"""BLEU of a trained run on IWSLT'14 valid and test, into its results.json.

The console command `fairseq-asam-evaluate` does the same;
`fairseq-asam-evaluate --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
