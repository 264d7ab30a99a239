import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    from harness import make_data_bin

    return make_data_bin(str(tmp_path_factory.mktemp("toy")))
