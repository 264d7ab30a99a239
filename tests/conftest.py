import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    from harness import make_data_bin

    return make_data_bin(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A console main called in a test points the root logger at that test's captured stdout
    (cli._log_to_stdout); put it back, so that a later test's log lines do not go to a closed
    stream ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level
