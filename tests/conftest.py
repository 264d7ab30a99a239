import functools
import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The suite's models are tiny: one thread each is fastest, and `make test` runs a pytest worker
# per core (below), whose torch threads would otherwise fight over the cores (a 2-thread
# fairseq-generate beside another worker ran 4x slower).  Children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    from harness import make_data_bin

    return make_data_bin(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory):
    """The data folder that the real preparation (`prepare.prepare_iwslt14`) makes of a small
    sample archive in the real IWSLT'14 layout: `harness.SAMPLE_N_TRAIN` (300) training pairs,
    `SAMPLE_N_DEV` (12) segments per dev/test set, `SAMPLE_BPE_MERGES` (200) merges;
    313 / 14 / 60 train / valid / test pairs. It holds `data-bin/` (`prepare.DATA_BIN`, for
    fairseq-train and fairseq-generate), the references (`prepare.reference_files(folder)`),
    and the text of each step (`{split}.tok.*`, `code`, `{split}.bpe.*`, `{split}.raw.*`).
    Its archive is `<folder>/../../de-en.tgz`. Shared by the whole session: do not change it
    (copy it first)."""
    from harness import prepare_sample

    return prepare_sample(str(tmp_path_factory.mktemp("sample")))


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    from harness import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def wheel_venv(wheel, tmp_path_factory):
    """(venv, purelib): the wheel installed into a venv outside the checkout."""
    from harness import install_wheel

    return install_wheel(wheel, tmp_path_factory.mktemp("venv"))


@pytest.fixture(scope="session")
def tiny_grid(wheel_venv, prepared_sample, tmp_path_factory):
    """The session's ONE end-to-end grid (harness.TINY_GRID_ARGV), run by the wheel's
    fairseq-asam-table4 from a folder outside the checkout on `prepared_sample`: a
    harness.TinyGrid.  Tests that change a grid work on a copy."""
    from harness import TinyGrid, read_process_records, run_tiny_grid

    from fairseq_asam_experiments import prepare

    root = tmp_path_factory.mktemp("tiny")
    data_bin = os.path.join(prepared_sample, prepare.DATA_BIN)
    done = run_tiny_grid(wheel_venv[0], data_bin, root / "out", root, root / "processes.jsonl")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = (root / "out" / "report" / "table4.md").read_text()
    processes = read_process_records(root / "processes.jsonl")
    return TinyGrid(root / "out", data_bin, done.stdout, report, processes)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: one thread is fastest and immune to a busy machine (a module's tests use it
    with `pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A console main called in a test points the root logger at that test's captured stdout
    (cli.run_command); put it back, so that a later test's log lines do not go to a closed
    stream ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


# `make test` runs the suite on every core (pytest-xdist, `-n auto`).  A test file is one unit of
# work (its tests share module and session fixtures), the files that read a session-wide costly
# thing are one unit with it (one per session, not one per worker): the spawned DDP group
# (harness.ddp_results) and the wheel's tiny-preset grid (`tiny_grid`); the longest units start
# first (seconds under `-n auto`).  A plain `pytest` runs the same tests in one process.
DDP_UNIT, TINY_GRID_UNIT = "ddp", "tiny-grid"
SHARED_UNITS = {"ddp_results(": DDP_UNIT, "tiny_grid": TINY_GRID_UNIT}  # a file's text -> unit
LONGEST_FIRST = (
    "test_readme_commands.py",  # `make tiny` and the Quick start: 150 s
    TINY_GRID_UNIT,  # the wheel, its grid (submitit-local jobs), a resumed run: 105 s
    DDP_UNIT,  # the spawned group: 50 s
    "test_hydra_multirun.py",  # submitit-local jobs, then a single run: 35 s
)


@functools.lru_cache(maxsize=None)
def unit_of_work(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    shared = [unit for mark, unit in SHARED_UNITS.items() if mark in text]
    return shared[0] if shared else os.path.basename(path)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of_work(str(item.path)), len(rank)))  # stable


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown when it is not installed or loaded
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":  # any other --dist is obeyed
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByUnitOfWork(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return unit_of_work(os.path.join(str(config.rootpath), nodeid.split("::")[0]))

    config.option.loadscopereorder = False  # keep LONGEST_FIRST (xdist >= 3.8 sorts by test count)
    return ByUnitOfWork(config, log)
