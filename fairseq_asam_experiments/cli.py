"""What every console command of the kit shares (`fairseq-asam-<name>`, see setup.py).

Each command is its module's `main(argv=None) -> int`: it parses its flags and runs its work
through `run_command`, which logs to stdout at the command's level (fairseq's format: `logs`).
A user error (the kit's `ExperimentError`, or the plugin's `FairseqAsamError` from a tool that
loads it) ends it with status 1 and one line on stderr, `fairseq-asam-<name>: error: <message>`;
Ctrl-C with one line and status 130.  Anything else is a bug and keeps its traceback.
"""

import logging
import sys
from typing import Callable, Optional

from .errors import ExperimentError
from .logs import log_to_stdout

ERROR_STATUS = 1
INTERRUPTED_STATUS = 130  # the shell's status for a program ended by SIGINT


def run_command(program: str, work: Callable[[], int], level: Optional[int] = logging.INFO) -> int:
    """`work()`, its progress logged to stdout at `level` (None: logging left as it is), with a
    user error as one line on stderr and status 1 (or the error's own `exit_status`), and a
    Ctrl-C wherever it comes as one line and status 130."""
    if level is not None:
        log_to_stdout(level)
    try:
        return work()
    except Exception as error:
        # The plugin's errors are looked up, not imported, so that commands without torch stay so.
        plugin_errors = sys.modules.get("fairseq_asam.errors")
        kinds = (ExperimentError,) + ((plugin_errors.FairseqAsamError,) if plugin_errors else ())
        if not isinstance(error, kinds):
            raise
        print(f"{program}: error: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return getattr(error, "exit_status", ERROR_STATUS)
    except KeyboardInterrupt:
        print(f"{program}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS
