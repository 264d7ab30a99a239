"""scripts/gpu_check.sh's checks, run on the CPU (flat fp16 emulated, gloo): the prepared GPU
command is exercised in CI, and its checks hold here too."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a subprocess running every check, DDP workers included

GPU_CHECK = os.path.join(os.path.dirname(__file__), "gpu_check.py")
EXPECTED_CHECKS = ["fp32", "fp16-flat", "bf16", "amp", "ddp", "ddp-dummy-batch"]


def test_gpu_checks_pass_on_cpu():
    proc = subprocess.run(
        [sys.executable, GPU_CHECK, "--device", "cpu"], capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split("] ", 1)[1].split(":", 1)[0] for line in lines] == EXPECTED_CHECKS
    assert all(line.startswith("[ok]") for line in lines)
    assert (
        proc.stdout.strip().splitlines()[-1]
        == f"{len(EXPECTED_CHECKS)}/{len(EXPECTED_CHECKS)} checks passed"
    )
