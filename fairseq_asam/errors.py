"""The one error convention of fairseq-asam, plugin and experiment kit alike.

Every error a user fixes (a flag, a file, a failed run) is a `FairseqAsamError` whose message
names the flag or the file; it is reported as one line, `<program>: error: <message>`, never as
a traceback (the plugin's excepthook for fairseq-train, `experiments.cli` for the kit's
commands).  Anything else is a bug and keeps its traceback.
"""


class FairseqAsamError(Exception):
    """An error the user fixes; the message names the flag or the file, in one line."""


class ConfigError(FairseqAsamError, ValueError):
    """A bad command-line value; its message names the flag to fix."""


class TaskBypassError(FairseqAsamError, RuntimeError):
    """A task replaced `train_step`, so the sharpness-aware pass never ran."""
