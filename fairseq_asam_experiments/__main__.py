"""`python -m fairseq_asam_experiments <command> [flags]` (cli.main; table4: table4.main)."""

import sys

if sys.argv[1:2] == ["table4"]:
    from .table4 import main

    raise SystemExit(main(sys.argv[2:]))
from .cli import main

raise SystemExit(main())
