"""What every console command of the kit shares (`fairseq-asam-<name>`, see setup.py).

Each command is its module's `main(argv=None) -> int`: it parses its flags, logs progress to
stdout (fairseq's format: `logs`) and runs its work through `run_command`.  A user error (the
kit's `ExperimentError`, or the plugin's `FairseqAsamError` from a tool that loads it) ends it
with status 1 and one line on stderr, `fairseq-asam-<name>: error: <message>`; Ctrl-C with one
line and status 130.  Anything else is a bug and keeps its traceback.
"""

import sys
from typing import Callable

from .errors import ExperimentError

ERROR_STATUS = 1
INTERRUPTED_STATUS = 130  # the shell's status for a program ended by SIGINT


def run_command(program: str, work: Callable[[], int]) -> int:
    """`work()`, with a user error as one line on stderr and status 1 (or the error's own
    `exit_status`), and a Ctrl-C wherever it comes as one line and status 130."""
    try:
        return work()
    except Exception as error:
        if not _is_user_error(error):
            raise
        print(f"{program}: error: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return getattr(error, "exit_status", ERROR_STATUS)
    except KeyboardInterrupt:
        print(f"{program}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS


def _is_user_error(error: Exception) -> bool:
    # The plugin's errors are looked up, not imported, so that commands without torch stay so.
    plugin_errors = sys.modules.get("fairseq_asam.errors")
    kinds = (ExperimentError,) + ((plugin_errors.FairseqAsamError,) if plugin_errors else ())
    return isinstance(error, kinds)
