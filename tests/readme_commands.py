"""The documentation's shell commands, run as a user would run them (tests/test_readme_commands.py).

A fenced ```bash (or ```sh / ```shell) block of any README.md in the checkout, or of a page of
docs/ (docs/*.md), is a list of commands a reader is told to run. Each one runs from the root of
a fresh copy of the checkout (the files git tracks, plus untracked ones it does not ignore), in
a checkout where the README's set-up has been done: `.venv/bin` there links to the venv these
tests run in, which is also first on PATH (as after `. .venv/bin/activate`), so `python`,
`fairseq-train` and `fairseq-asam-*` are the installed ones, and `make tiny` finds `.venv` up
to date and never rebuilds it.

A block that must not run here says so on its FIRST line, which GitHub shows to the reader:

    # not run by the tests: <why>

The block runs under `bash` with `set -eo pipefail`: the first failing command stops it, and
the failure names the file, the block's line, its first line, the failing command and the
tail of its output (stdout and stderr together).

The test suite runs every block with its training budget cut to SUITE_MAX_UPDATE updates: every
`--max-update M` of a block becomes min(M, N), and `make tiny` gets `TINY_FLAGS=--max-update N`.
That checks that each command works (and keeps `make test` within its time); the figures the
documentation quotes from a full run are checked only when the blocks run as written:
FAIRSEQ_ASAM_README_MAX_UPDATE=0 (another N: that budget).

`python tests/readme_commands.py [FILE.md ...]` runs the blocks of the given Markdown files (by
default every README.md and docs/*.md of the checkout) the same way and prints one line per block.

relative_links() and broken_links() check that every relative link of those files (a file, a
folder, a picture, a heading's anchor) points at something that exists.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "# not run by the tests:"
SHELL_LANGUAGES = ("bash", "sh", "shell")
MAX_UPDATE_VARIABLE = "FAIRSEQ_ASAM_README_MAX_UPDATE"
SUITE_MAX_UPDATE = 12  # the suite's budget for a documented training command
BLOCK_TIMEOUT = 1200  # seconds for one block
OUTPUT_TAIL_LINES = 40
LINE_CUT = 300  # characters of one output line in a failure message (fairseq logs whole configs)
FAILED_AT = "documented command failed at "  # what the ERR trap prints before the failing command
DOCS_FOLDER = "docs"  # its *.md pages are documentation too, not only README.md files
# Folders never searched for READMEs when the checkout is not a git repository.
NOT_SOURCE = {".git", ".venv", "runs", "build", "dist", "data-bin", "outputs", "__pycache__"}
# Variables of the environment that would make a block run unlike a user's shell: an outer
# make's flags and the Makefile's own variables (the checkout's defaults apply).
DROPPED_VARIABLES = (
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "VENV",
    "TINY_OUT",
    "TINY_FLAGS",
    "PYTHONHOME",
    "OMP_NUM_THREADS",  # tests/conftest.py sets it for the suite; a block sets its own
)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_MAX_UPDATE = re.compile(r"(--max-update(?:\s+|=))(\d+)")


@dataclass(frozen=True)
class Block:
    source: str  # the Markdown file's path, relative to the checkout's root
    line: int  # line number (1-based) of the opening fence; the block's first line is line + 1
    language: str
    text: str  # the block's content, the fence's indentation removed

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0].strip() if self.text.strip() else ""

    @property
    def skip_reason(self) -> Optional[str]:
        """The reason after the marker on the block's first line, or None: the block runs."""
        if self.first_line.startswith(MARKER):
            return self.first_line[len(MARKER) :].strip()
        return None

    @property
    def name(self) -> str:
        return f"{self.source}:{self.line}"


class BlockFailed(AssertionError):
    pass


def extract_blocks(path: str, root: str = ROOT) -> List[Block]:
    """The fenced shell blocks of the Markdown file `path`, in order."""
    source = os.path.relpath(path, root)
    if source.startswith(os.pardir + os.sep):  # a Markdown file outside the checkout
        source = os.path.abspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = []
    number = 0
    while number < len(lines):
        opening = _FENCE.match(lines[number])
        number += 1
        if not opening:
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        language = opening.group("info").split()[0].lower() if opening.group("info") else ""
        start, body = number, []
        while number < len(lines):
            closing = _FENCE.match(lines[number])
            if (
                closing
                and not closing.group("info")
                and closing.group("fence")[0] == fence[0]
                and len(closing.group("fence")) >= len(fence)
            ):
                break
            body.append(
                lines[number][len(indent) :]
                if lines[number].startswith(indent)
                else lines[number].lstrip()
            )
            number += 1
        else:
            raise ValueError(f"{source}:{start}: the code block opened here is never closed")
        number += 1
        if language in SHELL_LANGUAGES:
            blocks.append(Block(source, start, language, "\n".join(body) + "\n"))
    return blocks


# [text](target) and ![alt](target), with an optional "title"; inline code is removed first.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)[^`].*?\1")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")


def _prose_lines(path: str) -> List[tuple]:
    """(line number, text) of the Markdown file's lines outside fenced code blocks."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    prose, fence = [], None
    for number, line in enumerate(lines, start=1):
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group("fence")
        elif fence is not None and opening and opening.group("fence")[0] == fence[0]:
            if len(opening.group("fence")) >= len(fence) and not opening.group("info"):
                fence = None
        elif fence is None:
            prose.append((number, line))
    return prose


def heading_anchors(path: str) -> set:
    """The anchors GitHub gives the Markdown file's headings: lowercased, punctuation (anything
    but letters, digits, '_', '-' and spaces) removed, spaces turned into '-'; a repeated anchor
    gets -1, -2, ..."""
    anchors, seen = set(), {}
    for _, line in _prose_lines(path):
        heading = _HEADING.match(line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def relative_links(path: str) -> List[tuple]:
    """(line number, target) of every link and picture of the Markdown file that points inside
    the checkout: neither a URL (scheme:...) nor inside code."""
    links = []
    for number, line in _prose_lines(path):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                links.append((number, target))
    return links


def broken_links(path: str, root: str = ROOT) -> List[str]:
    """'file:line: target (why)' for each relative link of `path` whose file or folder does not
    exist, or whose #anchor is no heading of the Markdown file it points at."""
    source = os.path.relpath(path, root)
    broken = []
    for number, target in relative_links(path):
        name, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
        if not os.path.exists(linked):
            broken.append(f"{source}:{number}: {target} (no such file)")
        elif anchor and linked.endswith(".md") and anchor not in heading_anchors(linked):
            broken.append(f"{source}:{number}: {target} (no heading with that anchor)")
    return broken


def checkout_files(root: str = ROOT) -> List[str]:
    """The checkout's files, relative to `root`: git's tracked and untracked-but-not-ignored
    files, or (not a git checkout) every file outside NOT_SOURCE and hidden folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = sorted({name for name in listed.split("\0") if name})
        return [name for name in names if os.path.isfile(os.path.join(root, name))]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(
                d for d in subfolders if d not in NOT_SOURCE and not d.startswith(".")
            )
            found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files)]
        return found


def documentation_files(root: str = ROOT) -> List[str]:
    """Every README.md of the checkout and every docs/*.md page (absolute paths), the top-level
    README.md first."""
    names = [
        n
        for n in checkout_files(root)
        if os.path.basename(n) == "README.md"
        or (os.path.dirname(n) == DOCS_FOLDER and n.endswith(".md"))
    ]
    names.sort(key=lambda n: (n.count("/"), n))
    return [os.path.join(root, n) for n in names]


def all_blocks(root: str = ROOT) -> List[Block]:
    return [block for path in documentation_files(root) for block in extract_blocks(path, root)]


def copy_checkout(root: str, dest: str, venv_bin: str) -> str:
    """A copy of the checkout in `dest` whose `.venv` is the running venv (never rebuilt)."""
    for name in checkout_files(root):
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, name), target)
    venv = os.path.join(dest, ".venv")
    os.makedirs(venv)
    os.symlink(os.path.abspath(venv_bin), os.path.join(venv, "bin"))
    # The Makefile's stamp: .venv/.installed newer than setup.py means "set up, reuse it".
    stamp = os.path.join(venv, ".installed")
    open(stamp, "w").close()
    setup_py = os.path.join(dest, "setup.py")
    if os.path.exists(setup_py):
        older = os.stat(stamp).st_mtime - 60
        os.utime(setup_py, (older, older))
    if os.path.exists(os.path.join(dest, "Makefile")):
        # make -q: exit status 0 only if the venv target is up to date, i.e. no make command of a
        # block can reinstall into (through the link) the venv the tests run in.
        question = subprocess.run(
            ["make", "-q", ".venv/.installed"], cwd=dest, env=block_environment(venv_bin)
        )
        if question.returncode != 0:
            raise RuntimeError(f"make would rebuild the linked .venv in {dest}; not running it")
    return dest


def block_environment(venv_bin: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_VARIABLES}
    env["PATH"] = os.path.abspath(venv_bin) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = os.path.dirname(os.path.abspath(venv_bin))
    return env


def shorten_max_update(text: str, max_update: Optional[int]) -> str:
    """`text` with every `--max-update M` lowered to min(M, max_update) (None: unchanged)."""
    if max_update is None:
        return text
    return _MAX_UPDATE.sub(lambda m: f"{m.group(1)}{min(int(m.group(2)), max_update)}", text)


def max_update_from_environment() -> Optional[int]:
    """The blocks' budget: SUITE_MAX_UPDATE, or FAIRSEQ_ASAM_README_MAX_UPDATE's (0: as written,
    None)."""
    value = os.environ.get(MAX_UPDATE_VARIABLE, str(SUITE_MAX_UPDATE))
    if not value.isdigit():
        raise ValueError(f"{MAX_UPDATE_VARIABLE} must be a whole number >= 0, got {value!r}")
    return int(value) or None


def failure_message(block: Block, what: str, output: str) -> str:
    failed = [line for line in output.splitlines() if line.startswith(FAILED_AT)]
    at = f"  failed command: {failed[-1][len(FAILED_AT) :]}\n" if failed else ""
    tail = "\n".join(
        line if len(line) <= LINE_CUT else line[:LINE_CUT] + " [...]"
        for line in output.rstrip().splitlines()[-OUTPUT_TAIL_LINES:]
    )
    return (
        f"{block.source}:{block.line + 1}: the command block starting here {what}\n"
        f"  first line: {block.first_line}\n{at}"
        f"--- last {OUTPUT_TAIL_LINES} lines of its output (stdout and stderr) ---\n{tail}"
    )


def run_block(
    block: Block,
    workdir: str,
    venv_bin: str,
    max_update: Optional[int] = None,
    timeout: float = BLOCK_TIMEOUT,
) -> str:
    """Runs `block` with bash in `workdir`; returns its output or raises BlockFailed."""
    # Line 1 of the script is this prelude, so the block's line k is the script's line k + 1 and
    # the file's line block.line + k: the ERR trap names the file's line of the failing command.
    offset = block.line - 1
    prelude = (
        f"set -eo pipefail; trap 'echo \"{FAILED_AT}"
        f"{block.source}:$((LINENO + {offset})): $BASH_COMMAND\" >&2' ERR"
    )
    env = block_environment(venv_bin)
    if max_update is not None:
        env["TINY_FLAGS"] = f"--max-update {max_update}"
    with tempfile.NamedTemporaryFile(
        "w", suffix=".sh", prefix="readme-block-", dir=os.path.dirname(workdir), delete=False
    ) as script:
        script.write(prelude + "\n" + shorten_max_update(block.text, max_update))
    try:
        done = subprocess.run(
            ["bash", script.name],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as timed_out:
        output = (timed_out.stdout or b"").decode("utf-8", "replace")
        raise BlockFailed(failure_message(block, f"timed out after {timeout:.0f} s", output))
    finally:
        os.unlink(script.name)
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        raise BlockFailed(failure_message(block, f"failed (exit status {done.returncode})", output))
    return output


def run_in_fresh_checkout(
    block: Block, folder: str, root: str = ROOT, venv_bin: Optional[str] = None, **kwargs
) -> str:
    """Copies the checkout into `folder`/checkout and runs `block` there (see run_block)."""
    venv_bin = venv_bin or os.path.dirname(sys.executable)
    workdir = copy_checkout(root, os.path.join(folder, "checkout"), venv_bin)
    return run_block(block, workdir, venv_bin, **kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or documentation_files(ROOT)
    failed = 0
    for path in paths:
        for block in extract_blocks(os.path.abspath(path), ROOT):
            if block.skip_reason is not None:
                print(f"skipped {block.name}: {block.skip_reason}")
                continue
            with tempfile.TemporaryDirectory(prefix="readme-") as folder:
                try:
                    run_in_fresh_checkout(block, folder, max_update=max_update_from_environment())
                    print(f"ran     {block.name}: {block.first_line}")
                except BlockFailed as failure:
                    failed += 1
                    print(f"FAILED  {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
