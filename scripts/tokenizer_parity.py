#!/usr/bin/env python
"""How many lines of the IWSLT'14 text our tokenizer and plain sacremoses tokenize unlike Moses
tokenizer.perl.  Needs perl and a Moses checkout:

    python scripts/tokenizer_parity.py --moses-dir ~/mosesdecoder --archive de-en.tgz
"""

import sys

from fairseq_asam_experiments.cli import tokenizer_parity_main

if __name__ == "__main__":
    sys.exit(tokenizer_parity_main())
