"""`python -m fairseq_asam_experiments <command> [flags]`: fairseq-asam-<command> without its
console script on PATH (a run's sharpness measurement starts this way)."""

import argparse
import importlib
import sys

from . import COMMANDS

parser = argparse.ArgumentParser(prog=f"python -m {__package__}")
parser.add_argument("command", choices=list(COMMANDS))
command = parser.parse_args(sys.argv[1:2]).command
sys.exit(importlib.import_module(f"{__package__}.{COMMANDS[command]}").main(sys.argv[2:]))
