"""`python -m fairseq_asam_experiments <command> [flags]` (cli.main)."""

from .cli import main

raise SystemExit(main())
