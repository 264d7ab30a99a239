"""`python -m fairseq_asam.experiments <command> [flags]` (cli.main)."""

from .cli import main

raise SystemExit(main())
