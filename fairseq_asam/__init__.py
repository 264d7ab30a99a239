"""fairseq-asam: ASAM and SAM for fairseq (`--user-dir fairseq_asam --optimizer asam`).

Importing the package registers the optimizers `asam` and `sam`, installs the two-pass train
step on FairseqTask and lets fairseq checkpoints load under torch >= 2.6.
"""

import os
import sys

from . import checkpoint, errors, optim, two_pass  # noqa: F401  (registers the optimizers)

__version__ = "0.1.0"

# fairseq's --user-dir takes a path: `--user-dir "$(python -m fairseq_asam)"` prints this one.
USER_DIR = os.path.dirname(os.path.abspath(__file__))

two_pass.install()
checkpoint.allow_fairseq_checkpoints()


def _one_line_for_user_errors(previous_hook):
    """fairseq-train would print a traceback; a bad flag deserves one line naming it."""

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, errors.FairseqAsamError):
            print(f"fairseq-asam: error: {exc}", file=sys.stderr)
        else:
            previous_hook(exc_type, exc, tb)

    excepthook.wraps_fairseq_asam = True
    return excepthook


if not getattr(sys.excepthook, "wraps_fairseq_asam", False):
    sys.excepthook = _one_line_for_user_errors(sys.excepthook)
