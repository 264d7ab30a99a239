"""scripts/gpu_check.sh's script (tests/gpu_check.py) on the CPU: its data-parallel checks run in
the session's DDP group (gloo, torch DDP in place of NCCL and fairseq's CUDA-only wrapper), and
its report.  Its single-process checks (fp32, flat fp16, bf16, AMP) are those of test_update_rule
and test_modes, against the same reference, and are not run twice."""

import gpu_check
import pytest
from harness import DDP_WORLD_SIZE, ddp_results, ddp_scenario


def _ddp_checks(rank, data_bin):
    return gpu_check.ddp_rank_checks(rank, DDP_WORLD_SIZE, "cpu", data_bin)


ddp_scenario("gpu-check-ddp", _ddp_checks)


@pytest.mark.slow  # the session's spawned DDP group (harness.ddp_results)
def test_gpu_check_data_parallel_checks_pass_on_cpu(data_bin):
    checks = gpu_check.ddp_check_lines(ddp_results(data_bin, "gpu-check-ddp"), "cpu")
    assert [line.split(":", 1)[0] for _, line in checks] == ["ddp", "ddp-dummy-batch"]
    assert all(ok for ok, _ in checks), checks


def test_gpu_check_reports_one_line_per_check_and_exits_1_on_a_failure(monkeypatch, capsys):
    checks = [(True, "fp32: fine"), (False, "ddp: off by 1e-3")]
    monkeypatch.setattr(gpu_check, "run", lambda device: checks)
    assert gpu_check.main(["--device", "cpu"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["[ok] fp32: fine", "[FAIL] ddp: off by 1e-3", "1/2 checks passed"]
    monkeypatch.setattr(gpu_check, "run", lambda device: checks[:1])
    assert gpu_check.main(["--device", "cpu"]) == 0
