import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


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
    (cli._log_to_stdout); put it back, so that a later test's log lines do not go to a closed
    stream ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level
