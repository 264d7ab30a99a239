"""`python -m fairseq_asam_experiments <command> [flags]` (cli.main; prepare.main for prepare)."""

import sys

from . import prepare
from .cli import main

raise SystemExit(prepare.main(sys.argv[2:]) if sys.argv[1:2] == ["prepare"] else main())
