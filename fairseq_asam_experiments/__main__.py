"""`python -m fairseq_asam_experiments <command> [flags]`: fairseq-asam-<command> without its
console script on PATH (a run's sharpness measurement starts this way)."""

import importlib
import sys

# The command after `fairseq-asam-` -> the module whose `main` it is (setup.py's console scripts).
COMMANDS = {
    "table4": "table4",
    "prepare": "prepare",
    "evaluate": "evaluation",
    "report": "report",
    "sharpness": "sharpness",
    "benchmark": "benchmark",
    "trajectories": "trajectories",
    "precision": "precision",
    "correlation": "correlation",
}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.exit(f"usage: python -m fairseq_asam_experiments {{{','.join(COMMANDS)}}} [flags]")
module = importlib.import_module(f"{__package__}.{COMMANDS[sys.argv[1]]}")
sys.exit(module.main(sys.argv[2:]))
