"""Smoke tests of the benchmark (fairseq-asam-benchmark, benchmarks/step_cost.py): it runs and
reports every row; nothing about speed."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fairseq_asam_experiments import benchmark
from fairseq_asam_experiments.cli import benchmark_main

STEP_COST = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "step_cost.py"
)
TINY = benchmark.BenchmarkSpec(preset="small", warmup=0, timed=2, sam_interval=2)


@pytest.mark.slow
def test_cli_times_every_row(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = [
        "--preset",
        "small",
        "--warmup",
        "0",
        "--timed",
        "2",
        "--sam-interval",
        "2",
        "--no-memory",
        "--json",
        str(out),
    ]
    assert benchmark_main(argv) == 0

    result = json.loads(out.read_text())
    assert [row["name"] for row in result["rows"]] == [row.name for row in benchmark.rows_for(TINY)]
    for row in result["rows"]:
        for key in ("update_ms", "forward_ms", "backward_ms", "optimizer_ms", "tokens_per_s"):
            assert row[key] > 0, (row["name"], key)
    by_name = {row["name"]: row for row in result["rows"]}
    assert by_name["asam"]["perturb_restore_ms"] > 0
    assert by_name["asam-not-started"]["perturb_restore_ms"] == 0
    assert "asam-interval-2" in capsys.readouterr().out
    assert not torch.cuda.is_initialized()  # the CPU path never touches CUDA


@pytest.mark.slow
def test_peak_memory_in_a_fresh_process():
    adam = benchmark.rows_for(TINY)[0]
    memory = benchmark.measure_rows_memory(TINY, [adam])
    assert memory[adam.name]["peak_increase_bytes"] > 0


def test_script_rejects_a_bad_flag_in_one_line():
    done = subprocess.run(
        [sys.executable, STEP_COST, "--preset", "small", "--timed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "fairseq-asam-benchmark: error: --timed (1) must be >= --sam-interval (5): "
        "the interval row needs "
        "a sharpness-aware and a plain update among the timed ones"
    ]
