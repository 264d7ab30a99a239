"""The experiment kit's error convention (the plugin's own is `fairseq_asam.errors`).

Every error a user fixes (a flag, a file, a failed run) is an `ExperimentError` whose message
names the flag or the file; the commands (`cli`) report it as one line, `<program>: error:
<message>`, never as a traceback.  Anything else is a bug and keeps its traceback.  This module
imports nothing, so that `fairseq-asam-table4 --help` needs neither torch nor fairseq.
"""


class ExperimentError(Exception):
    """An error the user fixes; the message names the flag or the file, in one line."""


class SettingError(ExperimentError, ValueError):
    """A bad command-line value; its message names the flag to fix."""
