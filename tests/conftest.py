import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# End-to-end tests (subprocesses of fairseq-train/-generate, DDP workers, a wheel) that
# `-m "not slow"` leaves out, by module and test function; None: every test of the module.
# Listed here rather than marked in place for the modules whose authors mark them later.
SLOW_TESTS = {
    "test_ddp.py": None,
    "test_cli.py": {
        "test_training_runs_loss_falls_sharpness_logged",
        "test_resume_matches_uninterrupted_run_and_generate_loads",
        "test_adam_checkpoint_fine_tuned_with_asam_keeps_schedule",
        "test_bad_input_fails_with_one_line",
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = os.path.basename(str(item.fspath))
        if module in SLOW_TESTS and (
            SLOW_TESTS[module] is None or item.originalname in SLOW_TESTS[module]
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    from harness import make_data_bin

    return make_data_bin(str(tmp_path_factory.mktemp("toy")))
