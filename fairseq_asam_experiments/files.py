"""Writing files so that a path never holds a partial result: the kit's one atomic-write helper.

`atomic_output(path)` hands out a temporary name in the same folder (the rename stays on one file
system) and renames it onto `path` only when the block finishes without an error; on an error it
is removed.  Whatever writes the output (`open`, `torch.save`, matplotlib, fairseq-preprocess's
folder) writes to that name; a run killed mid-write leaves only a hidden `.<name>.tmp-*` entry.
"""

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Iterator, Optional

from .errors import ExperimentError


def temporary_name(path: str) -> str:
    """A fresh hidden name beside `path`: `.<name>.tmp-<random>`."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary path to write a file or a folder to; it becomes `path` on success.

    The folder of `path` is created if needed.  An existing folder at `path` is replaced.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        if os.path.isdir(temporary) and os.path.isdir(path):
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(temporary, path)  # FileNotFoundError naming it if nothing was written
    finally:
        if os.path.isdir(temporary) and not os.path.islink(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.lexists(temporary):
            os.unlink(temporary)


def write_text(path: str, text: str) -> None:
    """`text` to `path` in UTF-8 with \\n line ends, atomically."""
    with atomic_output(path) as temp, open(temp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_lines(path: str, lines: Iterable[str]) -> None:
    """One line per item, each ended by \\n, atomically."""
    write_text(path, "".join(f"{line}\n" for line in lines))


def write_json(path: str, obj: Any) -> None:
    """`obj` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json_object(path: str) -> Optional[dict]:
    """The JSON object in `path`, None if there is no such file; ExperimentError naming the file
    if it is not readable JSON or not an object (a truncated or foreign file)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExperimentError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise ExperimentError(f"{path} does not hold a JSON object")
    return loaded


# A stage stamp: `<folder>/<stage>.done.json`, the inputs a stage finished with.  The stage is
# done when its stamp holds the current inputs; the caller decides what a change means (redo
# the stage, or refuse in one line naming the changed setting: `changed_inputs`).
def stamp_path(folder: str, stage: str) -> str:
    return os.path.join(folder, f"{stage}.done.json")


def read_stamp(folder: str, stage: str) -> Optional[dict]:
    """The inputs `stage` last finished with, None if it never finished."""
    return read_json_object(stamp_path(folder, stage))


def write_stamp(folder: str, stage: str, inputs: dict) -> None:
    """Marks `stage` done with `inputs` (JSON-able), atomically."""
    write_json(stamp_path(folder, stage), inputs)


def clear_stamp(folder: str, stage: str) -> None:
    """Marks `stage` not done (before it is redone, so that a failed redo leaves no stale mark)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stamp_path(folder, stage))


def changed_inputs(old: dict, new: dict) -> list:
    """One `key old → new` per input that differs (added or removed ones included), sorted."""
    unset = "(unset)"  # not None: a switch (`--amp`) is stored as None and must count
    pairs = {key: (old.get(key, unset), new.get(key, unset)) for key in sorted(set(old) | set(new))}
    return [f"{key} {was} → {now}" for key, (was, now) in pairs.items() if was != now]
