"""Every ```bash block of every README.md and docs/*.md page runs, as a user would run it
(tests/readme_commands.py says how: a fresh copy of the checkout per block, the set-up done, bash
with `set -eo pipefail`).

A block whose first line is `# not run by the tests: <why>` is not run; the others run in the
full suite (`slow`): today the README's `make tiny` (the tiny preset of the Table 4 pipeline) and
its Quick start (a fairseq-train run and fairseq-generate). Two marked blocks are checked in a
cheaper way here: the set-up block must be the Makefile's venv recipe (which CI runs from a fresh
clone), and every `make <target>` a block shows must exist (`make -n`). The runner itself is
tested on a README with a broken block, and every relative link of those files must point at an
existing file (and heading), both in the fast subset.
"""

import os
import re
import subprocess
import sys

import pytest
from readme_commands import (
    MARKER,
    ROOT,
    SUITE_MAX_UPDATE,
    BlockFailed,
    all_blocks,
    block_environment,
    broken_links,
    documentation_files,
    extract_blocks,
    heading_anchors,
    max_update_from_environment,
    run_block,
    run_in_fresh_checkout,
    shorten_max_update,
)

BLOCKS = all_blocks()
RUN = [block for block in BLOCKS if block.skip_reason is None]
VENV_BIN = os.path.dirname(sys.executable)


QUOTED_BLEU_TOLERANCE = 1.0  # BLEU points: room for another CPU's rounding, not for drift


def text_after(block, lines: int = 12) -> str:
    """The file's `lines` lines after `block`'s closing fence: what it says the block prints."""
    with open(os.path.join(ROOT, block.source), encoding="utf-8") as f:
        readme = f.read().splitlines()
    end = block.line + len(block.text.splitlines())  # index of the line after the closing fence
    return "\n".join(readme[end + 1 : end + 1 + lines])


def _quick_start(block, output: str, shortened: bool) -> None:
    logged = r"\| train \| epoch \d+ \| loss [\d.]+ \| nll_loss [\d.]+ \| sharpness [\d.-]+ \|"
    assert re.search(logged, output), "fairseq-train logged no sharpness next to loss"
    printed = re.search(r"Generate test with beam=5: BLEU4 = (\d+\.\d+)", output)
    assert printed, "fairseq-generate printed no BLEU on the test split"
    quoted = re.search(r"BLEU4 = (\d+\.\d+)", text_after(block))
    assert quoted, f"{block.source}: the text after the Quick start quotes no BLEU4"
    if not shortened:
        assert abs(float(printed.group(1)) - float(quoted.group(1))) <= QUOTED_BLEU_TOLERANCE, (
            f"{block.source}: the Quick start says BLEU4 = {quoted.group(1)}, this run printed "
            f"{printed.group(1)}"
        )


def report_bleu(output: str, optimizer: str):
    """(valid, test) BLEU of `optimizer`'s row in the first report table of `output` whose header
    names both columns (the table's other columns may come and go)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        header = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and "Valid BLEU" in header and "Test BLEU" in header:
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
                if cells[0] == optimizer:
                    return (
                        float(cells[header.index("Valid BLEU")]),
                        float(cells[header.index("Test BLEU")]),
                    )
    return None


def _make_tiny(block, output: str, shortened: bool) -> None:
    # The report make tiny prints: a row per optimizer; with the preset's whole budget the model
    # learns the sample corpus's word-by-word translation (BLEU about 90).
    for optimizer in ("Adam", "Adam+SAM", "Adam+ASAM"):
        bleu = report_bleu(output, optimizer)
        assert bleu is not None, f"make tiny printed no report row for {optimizer}"
        assert shortened or min(bleu) > 50, (optimizer, bleu)


def test_report_bleu_reads_the_printed_table():
    printed = (
        "| Optimizer | Seeds | Checkpoint | Valid BLEU | Test BLEU | Paper valid |\n"
        "|---|---|---|---|---|---|\n"
        "| Adam | 1 | best-bleu | 96.98 | 97.06 | 35.34 |\n"
        "| Adam+SAM | 1 | best-bleu | 90.53 | 89.31 | 35.52 |\n"
    )
    assert report_bleu(printed, "Adam+SAM") == (90.53, 89.31)
    assert report_bleu(printed, "Adam+ASAM") is None


# What a block's output must show, beyond its exit status 0: keyed by a string of the block.
EXPECTED = {
    "fairseq-generate toy/data-bin": _quick_start,
    "make tiny": _make_tiny,
}


def test_readmes_docs_and_their_blocks_are_found():
    sources = {block.source for block in BLOCKS}
    assert {"README.md", os.path.join("configs", "README.md")} <= sources
    docs = os.path.join(ROOT, "docs")
    pages = {os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md")}
    assert pages and pages <= set(documentation_files())
    assert os.path.join("docs", "cost.md") in sources  # a docs page's blocks are read too
    assert os.path.join(ROOT, "README.md") == documentation_files()[0]
    # The blocks that must run here do: a README edit that marks them fails this test.
    for key in EXPECTED:
        assert [block for block in RUN if key in block.text], f"no runnable block shows {key!r}"


def test_every_marker_gives_a_reason_on_the_first_line():
    for block in BLOCKS:
        if block.skip_reason is not None:
            assert block.skip_reason, f"{block.name}: '{MARKER}' needs a reason after it"
        for number, line in enumerate(block.text.splitlines()[1:], start=2):
            assert MARKER not in line, (
                f"{block.source}:{block.line + number}: the marker works only on a block's "
                "first line; this block runs"
            )


def test_setup_block_is_the_makefiles_venv_recipe():
    """The README's set-up block (marked: it builds a venv) runs the commands CI runs."""
    [setup] = [block for block in BLOCKS if "-m venv" in block.text]
    readme = []
    for line in setup.text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            readme += [c.strip() for c in line.split("&&") if c.strip() != ". .venv/bin/activate"]
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    variables = dict(re.findall(r"^(\w+) *[:?]?= *(.*)$", makefile, re.M))
    recipe = re.search(r"^\$\(INSTALLED\):.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    made = []
    for line in recipe.splitlines():
        for _ in range(3):  # $(BIN) is $(VENV)/bin
            line = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)
        line = line.strip().replace(variables["VENV"] + "/bin/", "")
        if not line.startswith("touch "):
            made.append(line)
    assert readme == made, f"{setup.name}: the set-up block is not the Makefile's venv recipe"


def test_make_targets_shown_in_the_readmes_exist():
    targets = sorted(
        {
            target
            for block in BLOCKS
            for target in re.findall(r"^\s*make ([\w-]+)", block.text, re.M)
        }
    )
    for target in targets:
        dry = subprocess.run(
            ["make", "-n", target],
            cwd=ROOT,
            env=block_environment(VENV_BIN),  # not an outer make's flags (CI runs `make test`)
            capture_output=True,
            text=True,
        )
        assert dry.returncode == 0, f"`make {target}` (a documented block): {dry.stderr.strip()}"
    assert {"tiny", "test", "test-fast"} <= set(targets)


def test_max_update_is_shortened_never_lengthened(monkeypatch):
    text = "fairseq-train d --max-update 300 \\\n    --max-update=50 --max-updates-x 9\n"
    assert shorten_max_update(text, 100) == (
        "fairseq-train d --max-update 100 \\\n    --max-update=50 --max-updates-x 9\n"
    )
    assert shorten_max_update(text, None) == text
    monkeypatch.delenv("FAIRSEQ_ASAM_README_MAX_UPDATE", raising=False)
    assert max_update_from_environment() == SUITE_MAX_UPDATE  # the suite's default budget
    monkeypatch.setenv("FAIRSEQ_ASAM_README_MAX_UPDATE", "0")
    assert max_update_from_environment() is None  # as written
    monkeypatch.setenv("FAIRSEQ_ASAM_README_MAX_UPDATE", "-3")
    with pytest.raises(ValueError, match="FAIRSEQ_ASAM_README_MAX_UPDATE"):
        max_update_from_environment()


BROKEN_README = """\
# A README with a marked block, a block that works and a broken one

```bash
# not run by the tests: it would fail
exit 3
```

  ```bash
  echo "indented, inside a list item"
  ```

```bash
echo "the first command works"
fairseq-asam-report --no-such-flag runs/x
echo "never printed"
```

```text
not a shell block
```
"""


def test_a_broken_block_fails_with_its_place_and_its_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(BROKEN_README, encoding="utf-8")
    marked, indented, broken = extract_blocks(str(readme), str(tmp_path))
    assert (marked.line, indented.line, broken.line) == (3, 8, 12)
    assert marked.skip_reason == "it would fail"
    assert indented.skip_reason is None and broken.skip_reason is None
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert run_block(indented, str(workdir), VENV_BIN) == "indented, inside a list item\n"
    with pytest.raises(BlockFailed) as failure:
        run_block(broken, str(workdir), VENV_BIN)
    message = str(failure.value)
    print(message)  # shown with -s: what a broken README block reports
    assert message.startswith("README.md:13: the command block starting here failed")
    assert '  first line: echo "the first command works"\n' in message
    failed = "  failed command: README.md:14: fairseq-asam-report --no-such-flag runs/x\n"
    assert failed in message
    assert "fairseq-asam-report: error: unrecognized arguments: --no-such-flag" in message
    assert "command failed at README.md:14: fairseq-asam-report --no-such-flag" in message
    assert "never printed" not in message


def test_every_relative_link_of_the_documentation_resolves():
    broken = [entry for path in documentation_files() for entry in broken_links(path)]
    assert broken == [], "\n".join(broken)


LINKS_PAGE = """\
# A page

## Mixed precision and ε

## Reproducing Table 4 (IWSLT'14 De→En)

[here](#mixed-precision-and-ε), [there](other.md#reproducing-table-4-iwslt14-deen),
![a picture](pic.png), [a folder](sub), [the web](https://example.org/x.md),
`[in code](nowhere.md)` and [gone](missing.md), [no heading](other.md#setup),
[no heading here](#mixed-precision), [twice](other.md#twice-1), [thrice](other.md#twice-2)

```bash
cat [a block](nowhere.md)
```
"""

OTHER_PAGE = "## Reproducing Table 4 (IWSLT'14 De→En)\n\n## Twice\n\n## Twice\n"


def test_broken_links_names_each_missing_file_and_anchor(tmp_path):
    (tmp_path / "page.md").write_text(LINKS_PAGE, encoding="utf-8")
    (tmp_path / "other.md").write_text(OTHER_PAGE, encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert heading_anchors(str(tmp_path / "other.md")) == {
        "reproducing-table-4-iwslt14-deen",
        "twice",
        "twice-1",
    }
    assert broken_links(str(tmp_path / "page.md"), str(tmp_path)) == [
        "page.md:9: missing.md (no such file)",
        "page.md:9: other.md#setup (no heading with that anchor)",
        "page.md:10: #mixed-precision (no heading with that anchor)",
        "page.md:10: other.md#twice-2 (no heading with that anchor)",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[block.name for block in RUN])
def test_readme_block_runs(block, tmp_path):
    max_update = max_update_from_environment()
    try:
        output = run_in_fresh_checkout(
            block, str(tmp_path), venv_bin=VENV_BIN, max_update=max_update
        )
    except BlockFailed as failure:
        output, message = None, str(failure)
    if output is None:  # outside the except clause: no "during handling" chain in the report
        pytest.fail(message, pytrace=False)
    for key, check in EXPECTED.items():
        if key in block.text:
            cut = shorten_max_update(block.text, max_update) != block.text  # TINY_FLAGS too:
            check(block, output, shortened=cut or (max_update is not None and "make tiny" in key))
