"""fairseq-asam: ASAM and SAM for fairseq (`--user-dir fairseq_asam --optimizer asam`).

Importing the package registers the optimizers `asam` and `sam`, installs the two-pass train
step on FairseqTask and lets fairseq checkpoints load under torch >= 2.6.
"""
import os

from . import checkpoint, optim, two_pass  # noqa: F401  (registers the optimizers)

__version__ = "0.1.0"

# fairseq's --user-dir takes a path: `--user-dir "$(python -m fairseq_asam)"` prints this one.
USER_DIR = os.path.dirname(os.path.abspath(__file__))

two_pass.install()
checkpoint.allow_fairseq_checkpoints()
