#!/usr/bin/env python
"""Table 4 (Markdown, CSV) and plots from the runs of the Table 4 runner.

The console command `fairseq-asam-report` does the same;
`fairseq-asam-report --help` lists the flags.
"""

import sys

from fairseq_asam_experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
