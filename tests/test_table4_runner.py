"""The Table 4 runner never trusts stale or partial work: stage records, failures kept to their
run, locks, Ctrl-C, and a report of the grid's own results.

fairseq is replaced by the stubs of runner_stubs.py (a trainer that writes JSON "checkpoints"
holding their update count, an evaluation whose valid BLEU is that count), so that every test
here checks the runner's logic in seconds; tests/test_table4_pipeline.py runs the real thing.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import runner_stubs

from fairseq_asam_experiments import evaluation, report, runner
from fairseq_asam_experiments.errors import SettingError
from fairseq_asam_experiments.report import main as report_main


def grid(out, **kwargs):
    return runner_stubs.tiny_grid(runner, out, **kwargs)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def set_mode(out, run_name, mode):
    folder = os.path.join(str(out), "runs", run_name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, runner_stubs.MODE_FILE), "w") as f:
        f.write(mode)


def table(out):
    return (out / "report" / "table4.md").read_text()


def row(text, first_cell):
    """The cells of the Markdown row whose first cell is `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


# --------------------------------------------------------------------------------------------
# A failure stays its run's; the report is written with what finished
# --------------------------------------------------------------------------------------------


def test_every_kind_of_failure_is_recorded_and_the_grid_goes_on(stubbed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    set_mode(out, "sam-seed1", "fail")  # fairseq-train exits with status 1
    set_mode(out, "sam-seed2", "kill")  # the trainer is killed (SIGKILL)
    evaluate = evaluation.evaluate_checkpoint

    def exploding_evaluate(data_bin, save_dir, *args, **kwargs):
        if "adam-seed3" in save_dir:  # not a ExperimentError: e.g. torch.load's own error
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return evaluate(data_bin, save_dir, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", exploding_evaluate)
    config = grid(out, optimizers=("adam", "sam"), seeds=(1, 2, 3))
    with pytest.raises(runner.ExperimentError, match=r"3 run\(s\) failed") as failed:
        runner.run_grid(config)
    message = str(failed.value)
    assert "sam-seed1: train: fairseq-train failed with exit code 1" in message
    assert "sam-seed2: train: fairseq-train was killed by signal 9 (SIGKILL)" in message
    assert "adam-seed3: evaluate: RuntimeError: PytorchStreamReader failed" in message

    # Each failure is in its run's folder, with where it happened and the traceback.
    failure = read_json(out / "runs" / "adam-seed3" / "failure.json")
    assert failure["stage"] == "evaluate" and failure["type"] == "RuntimeError"
    assert "exploding_evaluate" in failure["traceback"]
    assert read_json(out / "runs" / "sam-seed2" / "failure.json")["stage"] == "train"
    # Every other run finished, after the failures (the grid went on).
    for name in ("adam-seed1", "adam-seed2", "sam-seed3"):
        assert read_json(out / "runs" / name / "results.json")["valid"]["bleu"] == 20.0
        assert not (out / "runs" / name / "failure.json").exists()

    text = table(out)
    assert row(text, "Adam")[:5] == [
        "Adam",
        "1,2 (n = 2 of 3)",
        "best-bleu",
        "20.00 ± 0.00",
        "20.15 ± 0.07",
    ]
    assert row(text, "Adam+SAM")[:4] == ["Adam+SAM", "3 (n = 1 of 3)", "best-bleu", "20.00"]
    assert row(text, "sam-seed1")[:3] == [
        "sam-seed1",
        "best-bleu",
        f"failed in train: fairseq-train failed with exit code 1; see "
        f"{out / 'runs' / 'sam-seed1' / 'train.log'}",
    ]
    assert row(text, "sam-seed2")[2].startswith("failed in train: fairseq-train was killed by")
    assert row(text, "adam-seed3")[2].startswith("failed in evaluate: RuntimeError:")
    assert row(text, "adam-seed1")[2:5] == ["done", "20", "20.00"]  # updates, valid BLEU

    # Fixed, the same command finishes the failed runs only; their failure records go.
    for name in ("sam-seed1", "sam-seed2"):
        (out / "runs" / name / runner_stubs.MODE_FILE).unlink()
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", evaluate)
    done_before = (out / "runs" / "adam-seed1" / "results.json").stat().st_mtime_ns
    runner.run_grid(config)
    assert (out / "runs" / "adam-seed1" / "results.json").stat().st_mtime_ns == done_before
    assert not list(out.glob("runs/*/failure.json"))
    assert row(table(out), "Adam")[1] == "1,2,3" and "n = " not in row(table(out), "Adam+SAM")[1]


def test_a_failed_sharpness_measurement_is_recorded_too(stubbed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(
        runner, "SHARPNESS_COMMAND", (sys.executable, "-c", "import sys; sys.exit(3)")
    )
    with pytest.raises(
        runner.ExperimentError, match="asam-seed1: sharpness: fairseq-asam-sharpness"
    ):
        runner.run_grid(grid(out, optimizers=("asam",), sharpness_rho=0.05))
    failure = read_json(out / "runs" / "asam-seed1" / "failure.json")
    assert failure["stage"] == "sharpness" and "exit code 3" in failure["error"]
    # Evaluated but not measured: no result with a stale or missing sharpness is reported.
    assert "sharpness" not in read_json(out / "runs" / "asam-seed1" / "results.json")


def test_sharpness_runs_on_the_runs_own_gpu(stubbed, tmp_path):
    """GridConfig.gpus set, CUDA_VISIBLE_DEVICES unset: GPU "7" is device 7 of this machine,
    not the second of the grid's list."""
    out = tmp_path / "out"
    config = grid(out, optimizers=("asam",), sharpness_rho=0.05, gpus=["4", "7"])
    data_bin = config.data_bin_path
    runner.execute_run(config, runner.Run("asam", 1), data_bin, {}, gpu="7")
    measured = read_json(out / "runs" / "asam-seed1" / "results.json")["sharpness"]
    assert measured["cuda_visible_devices"] == "7"
    argv = measured["argv"]
    assert argv[argv.index("--device") + 1] == "cuda:0"  # the one GPU that process sees
    assert argv[argv.index("--rho") + 1] == "0.05" and argv[0].endswith("checkpoint_best.pt")


# --------------------------------------------------------------------------------------------
# Settings: a re-run redoes a stage or refuses; it never silently reuses
# --------------------------------------------------------------------------------------------


def test_a_higher_max_update_continues_training_and_the_report_shows_the_new_checkpoint(
    stubbed, tmp_path
):
    out = tmp_path / "out"
    runner.run_grid(grid(out, max_update=20))
    assert row(table(out), "Adam")[3] == "20.00"

    runner.run_grid(grid(out, max_update=30))
    for name in ("adam-seed1", "asam-seed1"):
        checkpoint = read_json(out / "runs" / name / "checkpoints" / "checkpoint_last.pt")
        assert checkpoint == {"updates": 30, "seed": 1, "resumed_from": 20}  # continued
        results = read_json(out / "runs" / name / "results.json")
        assert results["valid"]["bleu"] == 30.0  # the 30-update checkpoint was evaluated
        record = read_json(out / "runs" / name / "training.json")
        assert record["status"] == "finished" and record["settings"]["--max-update"] == "30"
    assert row(table(out), "Adam")[3] == "30.00" and row(table(out), "Adam+ASAM")[3] == "30.00"
    assert "20.00" not in table(out)


def test_other_training_settings_are_refused_in_one_line_before_any_work(stubbed, tmp_path, capsys):
    out = tmp_path / "out"
    runner.run_grid(grid(out, max_update=30))
    results = out / "runs" / "adam-seed1" / "results.json"
    before = results.stat().st_mtime_ns

    with pytest.raises(SettingError) as refused:
        runner.run_grid(grid(out, max_update=20))
    assert "adam-seed1, asam-seed1 trained with other settings: --max-update 30 → 20" in str(
        refused.value
    )
    with pytest.raises(SettingError) as refused:
        runner.run_grid(grid(out, max_update=30, checkpoint="best-loss"))
    assert "--best-checkpoint-metric bleu → loss" in str(refused.value)
    assert "--eval-bleu (switch) removed" in str(refused.value)
    assert results.stat().st_mtime_ns == before  # nothing ran, nothing was rewritten


def test_a_protocol_that_reads_other_checkpoints_of_the_same_training_is_evaluated_again(
    stubbed, tmp_path
):
    out = tmp_path / "out"
    runner.run_grid(grid(out, checkpoint="best-loss"))
    log = (out / "runs" / "adam-seed1" / "train.log").read_text()
    runner.run_grid(grid(out, checkpoint="last"))  # trains alike (selection by loss)
    assert (out / "runs" / "adam-seed1" / "train.log").read_text() == log  # not trained again
    results = read_json(out / "runs" / "adam-seed1" / "results.json")
    assert results["protocol"] == "last" and results["checkpoint"]["path"].endswith(
        "checkpoint_last.pt"
    )
    text = table(out)
    assert text.startswith("# Table 4: IWSLT'14 De→En, Transformer — --checkpoint last")
    assert row(text, "Adam")[2] == "last" and "best-loss" not in text


def test_a_results_json_without_every_split_is_not_done(stubbed, tmp_path):
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",)))
    path = out / "runs" / "adam-seed1" / "results.json"
    results = read_json(path)
    # What `fairseq-asam-evaluate RUN --splits valid` leaves: valid only.
    for key in ("test", "scored_splits"):
        results.pop(key)
    path.write_text(json.dumps(results))
    runner.run_grid(grid(out, optimizers=("adam",)))
    assert read_json(path)["test"]["bleu"] == pytest.approx(20.1)


def test_write_results_merges_splits_of_one_evaluation_and_replaces_another(tmp_path):
    path = str(tmp_path / "results.json")
    first = {"evaluation": {"fingerprint": "a"}, "scored_splits": ["valid"], "valid": {"bleu": 1}}
    evaluation.write_results(path, first)
    evaluation.update_results(path, {"run": "adam-seed1", "sharpness": {"estimates": []}})
    same = {"evaluation": {"fingerprint": "a"}, "scored_splits": ["test"], "test": {"bleu": 2}}
    merged = evaluation.write_results(path, same)
    assert merged["valid"] == {"bleu": 1} and merged["test"] == {"bleu": 2}
    assert merged["scored_splits"] == ["test", "valid"] and "sharpness" in merged
    other = {"evaluation": {"fingerprint": "b"}, "scored_splits": ["valid"], "valid": {"bleu": 3}}
    replaced = evaluation.write_results(path, other)
    assert replaced["valid"] == {"bleu": 3} and "test" not in replaced  # no split of "a" left
    assert "sharpness" not in replaced and replaced["run"] == "adam-seed1"
    assert evaluation.evaluation_done(merged, {"fingerprint": "a"})
    assert not evaluation.evaluation_done(replaced, {"fingerprint": "b"})  # test is missing
    assert not evaluation.evaluation_done(merged, {"fingerprint": "b"})


def test_checkpoints_without_a_training_record_are_refused_not_guessed(stubbed, tmp_path):
    out = tmp_path / "out"
    unknown = out / "runs" / "adam-seed1"
    (unknown / "checkpoints").mkdir(parents=True)
    (unknown / "checkpoints" / "checkpoint_last.pt").write_text("{}")
    with pytest.raises(SettingError, match="adam-seed1 has checkpoints but no training.json"):
        runner.run_grid(grid(out, optimizers=("adam",)))


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------


def test_a_locked_run_is_skipped_and_said(stubbed, tmp_path, caplog):
    from fairseq_asam_experiments.layout import run_lock

    out = tmp_path / "out"
    with run_lock(str(out / "runs" / "adam-seed1")):
        runner.run_grid(grid(out))
        assert "adam-seed1: skipped, locked by pid" in caplog.text
        assert not (out / "runs" / "adam-seed1" / "training.json").exists()  # never touched
        assert read_json(out / "runs" / "asam-seed1" / "results.json")["valid"]["bleu"] == 20.0
        status = row(table(out), "adam-seed1")[2]
        assert status.startswith(f"in progress (pid {os.getpid()} on ")
        assert row(table(out), "Adam")[1] == "– (n = 0 of 1)"
    runner.run_grid(grid(out))  # unlocked: it runs now
    assert read_json(out / "runs" / "adam-seed1" / "results.json")["valid"]["bleu"] == 20.0


def start_launcher(out, max_update=20, optimizers="adam,asam"):
    return subprocess.Popen(
        [sys.executable, runner_stubs.STUB, "launch", str(out), str(max_update), optimizers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path, seconds=60):
    """The pids in `path` (stub.started), once there is one."""
    deadline = time.monotonic() + seconds
    while not (os.path.exists(path) and open(path).read().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return [int(line) for line in open(path).read().split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_second_launcher_skips_the_run_the_first_is_training(stubbed, tmp_path, caplog):
    out = tmp_path / "out"
    set_mode(out, "adam-seed1", "sleep")
    first = start_launcher(out)
    try:
        started = out / "runs" / "adam-seed1" / runner_stubs.STARTED_FILE
        (trainer,) = wait_for(started)
        runner.run_grid(grid(out, optimizers=("adam",)))  # the second launcher, here
        assert "adam-seed1: skipped, locked by pid" in caplog.text
        assert wait_for(started) == [trainer]  # no second trainer on that save directory
        assert alive(trainer)  # and the first one's is untouched
        assert not (out / "runs" / "adam-seed1" / "results.json").exists()
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


def test_ctrl_c_stops_the_children_starts_nothing_new_and_leaves_runs_resumable(tmp_path):
    out = tmp_path / "out"
    set_mode(out, "adam-seed1", "sleep")
    launcher = start_launcher(out, optimizers="adam,sam,asam")
    (trainer,) = wait_for(out / "runs" / "adam-seed1" / runner_stubs.STARTED_FILE)
    launcher.send_signal(signal.SIGINT)  # Ctrl-C to the launcher only
    try:
        stdout, stderr = launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise
    assert launcher.returncode == 130, stdout[-3000:] + stderr[-3000:]  # as the shell's Ctrl-C
    assert "interrupted (Ctrl-C)" in stderr and "resumable" in stderr
    assert not alive(trainer)  # the child was stopped and waited for
    assert "stub trainer: interrupted" in (out / "runs" / "adam-seed1" / "train.log").read_text()
    for name in ("sam-seed1", "asam-seed1"):  # queued runs never started
        assert not (out / "runs" / name / "training.json").exists()
    record = read_json(out / "runs" / "adam-seed1" / "training.json")
    assert record["status"] == "running"  # resumable, and not a failure
    assert not (out / "runs" / "adam-seed1" / "failure.json").exists()
    assert (out / "report" / "table4.md").exists()  # the report of what there is
    assert row(table(out), "adam-seed1")[2] == "interrupted in training (resumable)"

    # The same command again: the interrupted run resumes, the others run.
    (out / "runs" / "adam-seed1" / runner_stubs.MODE_FILE).unlink()
    again = start_launcher(out, optimizers="adam,sam,asam")
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "adam-seed1: interrupted earlier: resuming from checkpoint_last.pt" in stdout
    for name in ("adam-seed1", "sam-seed1", "asam-seed1"):
        assert read_json(out / "runs" / name / "results.json")["valid"]["bleu"] == 20.0


# --------------------------------------------------------------------------------------------
# The report takes the grid's results only
# --------------------------------------------------------------------------------------------


def test_report_takes_only_the_results_of_the_grids_preset_and_protocol(stubbed, tmp_path):
    out = tmp_path / "out"
    # A row of another grid (asam, 12 updates) trained into the folder earlier...
    runner.run_grid(grid(out, checkpoint="best-loss", optimizers=("asam",), max_update=12))
    runner.run_grid(grid(out, checkpoint="best-loss", optimizers=("adam", "sam")))
    # ...and, in this grid's runs, a result of another preset and one of another protocol:
    for name, entries in (("sam-seed1", {"preset": "paper"}), ("adam-seed1", {"protocol": "last"})):
        evaluation.update_results(str(out / "runs" / name / "results.json"), entries)
    report.write_report([str(out)], str(out / "report"))  # grid.json says adam,sam at 20
    text = table(out)
    assert row(text, "adam-seed1")[2].startswith("not current: --checkpoint last, the grid's is")
    assert row(text, "sam-seed1")[2].startswith("not current: preset paper, the grid's is tiny")
    assert row(text, "Adam")[1] == "– (n = 0 of 1)" and row(text, "Adam")[3] == "–"
    assert "Adam+ASAM" not in text  # asam-seed1 is of another grid (other --max-update)...
    assert "asam-seed1: trained with other settings than the grid's" in text  # ...and said so


def test_report_of_two_protocols_side_by_side(stubbed, tmp_path, capsys):
    by_loss, by_bleu = tmp_path / "best-loss", tmp_path / "best-bleu"
    runner.run_grid(grid(by_loss, checkpoint="best-loss", optimizers=("adam",)))
    runner.run_grid(grid(by_bleu, checkpoint="best-bleu", optimizers=("adam",)))
    both = tmp_path / "both"
    assert report_main([str(by_loss), str(by_bleu), "--out", str(both)]) == 0
    text = (both / "table4.md").read_text()
    assert text.startswith(
        "# Table 4: IWSLT'14 De→En, Transformer — --checkpoint best-loss, best-bleu"
    )
    rows = [line for line in text.splitlines() if line.startswith("| Adam |")]
    assert [r.split("|")[3].strip() for r in rows] == ["best-loss", "best-bleu"]
    assert "`--checkpoint best-bleu`: checkpoint_best.pt, the epoch with the highest" in text
    assert report_main([str(by_loss), str(by_bleu)]) == 1
    assert "--out is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Data: a run and its scores belong to the data they were made from
# --------------------------------------------------------------------------------------------


def test_other_data_in_the_same_data_bin_is_refused_not_reused(stubbed, tmp_path):
    out = tmp_path / "out"
    config = grid(out, optimizers=("adam",))
    runner.run_grid(config)
    results = out / "runs" / "adam-seed1" / "results.json"
    before = results.stat().st_mtime_ns
    again = grid(out, optimizers=("adam",))
    # The same folder, binarized again from other text: another dictionary.
    with open(os.path.join(config.data_bin, "dict.en.txt"), "w") as f:
        f.write("hello 3\n")
    with pytest.raises(SettingError) as refused:
        runner.run_grid(again)
    assert "adam-seed1 trained with other settings: data_content " in str(refused.value)
    assert results.stat().st_mtime_ns == before


def fake_preparation(calls):
    """prepare.prepare_iwslt14 without the work: a data-bin whose dictionary is the archive's
    text and the number of merges, and the untokenized references beside it."""
    from fairseq_asam_experiments import prepare

    def fake(archive, workdir, bpe_merges=prepare.DEFAULT_BPE_MERGES, **kwargs):
        calls.append((archive, bpe_merges))
        data_bin = runner_stubs.fake_data_bin(os.path.join(workdir, "data-bin", prepare.PREP_NAME))
        with open(archive) as f, open(os.path.join(data_bin, "dict.en.txt"), "w") as d:
            d.write(f"{f.read()} {bpe_merges}\n")
        tmp = os.path.join(workdir, prepare.PREP_NAME, "tmp")
        os.makedirs(tmp, exist_ok=True)
        settings = {  # what the real preparation records of the archive, and the merges
            "archive": os.path.abspath(archive),
            "archive_bytes": os.path.getsize(archive),
            "archive_mtime_ns": os.stat(archive).st_mtime_ns,
            "bpe_merges": bpe_merges,
        }
        prepare._StepRecords(workdir).mark_done("binarize", settings)
        for split in ("valid", "test"):
            path = os.path.join(tmp, f"{split}.raw.en")
            if not os.path.exists(path):  # the step is done (for this fake, whatever archive)
                with open(path, "w") as f:
                    f.write("a reference\n")
        return data_bin

    return fake


def archive_grid(out, archive, **kwargs):
    return runner.GridConfig(
        out_dir=str(out),
        preset=runner.TABLE4_PRESETS["tiny"],
        optimizers=("adam",),
        seeds=(1,),
        archive=str(archive),
        max_update=20,
        gpus=[],
        **kwargs,
    )


def test_a_new_archive_is_prepared_and_the_runs_of_the_old_data_are_refused(
    stubbed, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(runner.prepare, "prepare_iwslt14", fake_preparation(calls))
    first, second = tmp_path / "first.tgz", tmp_path / "second.tgz"
    first.write_text("first corpus")
    second.write_text("second corpus")
    out = tmp_path / "out"
    runner.run_grid(archive_grid(out, first))
    results = out / "runs" / "adam-seed1" / "results.json"
    before = results.stat().st_mtime_ns

    # The same archive: the preparation is asked again (its step records make that a no-op)
    # and the run is current.
    runner.run_grid(archive_grid(out, first))
    assert [archive for archive, _ in calls] == [str(first), str(first)]
    assert results.stat().st_mtime_ns == before

    # The same archive moved (size and time kept): the same data, prepared again, current.
    moved = tmp_path / "moved.tgz"
    os.rename(first, moved)
    runner.run_grid(archive_grid(out, moved))
    assert calls[-1][0] == str(moved) and results.stat().st_mtime_ns == before
    os.rename(moved, first)

    # Another archive: refused in one line before the preparation touches the run's data, or
    # the grid.json the report reads.
    grid_json = (out / "grid.json").read_bytes()
    prepared = len(calls)
    dictionary = (out / "data" / "data-bin" / "iwslt14.tokenized.de-en" / "dict.en.txt").read_text()
    with pytest.raises(SettingError) as refused:
        runner.run_grid(archive_grid(out, second))
    assert len(calls) == prepared  # not prepared
    assert (out / "grid.json").read_bytes() == grid_json
    assert f"was prepared from {moved} (" in str(refused.value)  # the last one it was
    assert f"adam-seed1 trained on it; preparing --archive {second} " in str(refused.value)
    assert "first corpus" in dictionary
    path = out / "data" / "data-bin" / "iwslt14.tokenized.de-en" / "dict.en.txt"
    assert path.read_text() == dictionary
    assert results.stat().st_mtime_ns == before

    # The data-bin deleted and prepared again from the other archive: refused as well.
    import shutil

    shutil.rmtree(out / "data" / "data-bin")
    with pytest.raises(SettingError, match="adam-seed1 trained with other settings: data_content"):
        runner.run_grid(archive_grid(out, second))


def prepared_and_trained(tmp_path, monkeypatch):
    """A grid of adam-seed1 on the fake preparation of one archive: (calls, archive, out)."""
    calls = []
    monkeypatch.setattr(runner.prepare, "prepare_iwslt14", fake_preparation(calls))
    archive = tmp_path / "de-en.tgz"
    archive.write_text("corpus")
    out = tmp_path / "out"
    runner.run_grid(archive_grid(out, archive))
    return calls, archive, out


def test_other_references_are_scored_again_without_training_again(stubbed, tmp_path, monkeypatch):
    calls, archive, out = prepared_and_trained(tmp_path, monkeypatch)
    run = out / "runs" / "adam-seed1"
    log = (run / "train.log").read_text()
    fingerprint = read_json(run / "results.json")["evaluation"]["fingerprint"]
    # Same size, other words: the references' content is what counts, for the report ...
    references = out / "data" / "iwslt14.tokenized.de-en" / "tmp" / "test.raw.en"
    references.write_text("b reference\n")
    report.write_report([str(out)], str(out / "report"))
    assert row(table(out), "adam-seed1")[2] == (
        f"not current: evaluation out of date: the test references ({references}) changed "
        "after the evaluation"
    )
    # ... and for the runner, which scores it again.
    runner.run_grid(archive_grid(out, archive))
    assert (run / "train.log").read_text() == log
    assert read_json(run / "results.json")["evaluation"]["fingerprint"] != fingerprint


def test_a_data_bin_of_another_presets_merges_is_prepared_again(stubbed, tmp_path, monkeypatch):
    """No --archive: the data-bin in <out>/data is used only if it was prepared with the
    preset's number of BPE merges."""
    calls, archive, out = prepared_and_trained(tmp_path, monkeypatch)
    tiny = runner.TABLE4_PRESETS["tiny"]
    other = runner.Table4Preset(**{**tiny.__dict__, "name": "tiny", "bpe_merges": 700})
    config = archive_grid(out, archive)
    config.archive, config.preset = None, other
    # Runs were trained on the data-bin: refused before it is prepared again ...
    with pytest.raises(SettingError, match="adam-seed1 trained on it"):
        runner.run_grid(config)
    assert calls[-1] == (str(archive), tiny.bpe_merges)
    # ... and prepared again (with the preset's merges) once no run depends on it.
    import shutil

    shutil.rmtree(out / "runs")
    runner.run_grid(config)
    assert calls[-1] == (str(archive), 700)


# --------------------------------------------------------------------------------------------
# The report of several folders keeps each grid's rows apart
# --------------------------------------------------------------------------------------------


def test_report_of_several_folders_never_averages_two_grids_into_one_row(stubbed, tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    runner.run_grid(grid(short, optimizers=("adam",), max_update=20))
    config = grid(long, optimizers=("adam",), max_update=40)
    config.preset = runner.TABLE4_PRESETS["paper"]  # another preset, another budget
    runner.run_grid(config)
    both = tmp_path / "both"
    assert report_main([str(short), str(long), "--out", str(both)]) == 0
    text = (both / "table4.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| Adam |")]
    assert len(rows) == 2, text  # one row per grid, not one mean over both
    header = [c.strip() for c in text.split("\n| Optimizer |")[1].split("\n")[0].split("|")]
    assert "Preset" in header and "Folder" in header
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    by_preset = {c[header.index("Preset") + 1]: c for c in cells}
    assert by_preset["tiny"][3] == "20.00" and by_preset["paper"][3] == "40.00"
    assert by_preset["tiny"][header.index("Folder") + 1] == str(short)
    assert by_preset["tiny"][1] == "1" and "n = " not in by_preset["paper"][1]
    run_header = text.split("| Run |")[1].split("\n")[0]
    assert "Folder" in run_header
    assert row(text, "adam-seed1")[-1] in (str(short), str(long))
    csv_lines = (both / "table4.csv").read_text().splitlines()
    assert csv_lines[0].endswith(",preset,folder") and len(csv_lines) == 3


# --------------------------------------------------------------------------------------------
# A stage found stale and not redone leaves nothing stale behind
# --------------------------------------------------------------------------------------------


def test_a_sharpness_of_another_rho_is_never_reported_when_its_redo_fails(
    stubbed, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("asam",), sharpness_rho=0.05))
    path = out / "runs" / "asam-seed1" / "results.json"
    assert read_json(path)["sharpness_settings"]["rho"] == 0.05
    monkeypatch.setattr(
        runner, "SHARPNESS_COMMAND", (sys.executable, "-c", "import sys; sys.exit(3)")
    )
    with pytest.raises(runner.ExperimentError, match="asam-seed1: sharpness:"):
        runner.run_grid(grid(out, optimizers=("asam",), sharpness_rho=0.5))
    results = read_json(path)
    assert "sharpness" not in results and "sharpness_settings" not in results
    text = table(out)
    assert "0.2500" not in text and "Adaptive sharpness" not in text
    # The report checks it too: a results.json holding a sharpness of another ρ (written by
    # hand, or by an older version) is shown without it.
    evaluation.update_results(
        str(path),
        {
            "sharpness": {"estimates": [{"measure": "adaptive", "sharpness": 0.25}]},
            "sharpness_settings": {"rho": 0.05, "evaluation": results["evaluation"]["fingerprint"]},
        },
    )
    report.write_report([str(out)], str(out / "report"))
    assert "0.2500" not in table(out)


def test_an_evaluation_found_stale_is_not_reported_when_its_redo_fails(
    stubbed, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",)))
    assert row(table(out), "Adam")[3] == "20.00"
    best = out / "runs" / "adam-seed1" / "checkpoints" / "checkpoint_best.pt"
    best.write_text(json.dumps({"updates": 17, "seed": 1, "resumed_from": 0}))  # another file

    def failing(*args, **kwargs):
        raise runner.ExperimentError("fairseq-generate failed with exit code 1")

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", failing)
    with pytest.raises(runner.ExperimentError, match="adam-seed1: evaluate:"):
        runner.run_grid(grid(out, optimizers=("adam",)))
    text = table(out)
    assert row(text, "Adam")[3] == "–" and "20.00" not in text
    assert row(text, "adam-seed1")[2].startswith("failed in evaluate:")
    # The report compares the evaluation with the checkpoint files too: a results.json whose
    # checkpoint changed since is not current, whoever left it.
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", runner_stubs.fake_evaluate)
    runner.run_grid(grid(out, optimizers=("adam",)))
    assert row(table(out), "Adam")[3] == "17.00"
    best.write_text(json.dumps({"updates": 19, "seed": 1, "resumed_from": 0}))
    report.write_report([str(out)], str(out / "report"))
    text = table(out)
    assert row(text, "Adam")[3] == "–"
    assert row(text, "adam-seed1")[2] == (
        "not current: evaluation out of date: checkpoint_best.pt changed after the evaluation"
    )


def test_a_result_stays_when_its_checkpoints_are_pruned_or_its_folder_moves(stubbed, tmp_path):
    # What the report cannot check is not a change: checkpoints deleted after the evaluation
    # (disk space), or the output folder moved elsewhere with its timestamps.
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",)))
    for checkpoint in (out / "runs" / "adam-seed1" / "checkpoints").iterdir():
        checkpoint.unlink()
    report.write_report([str(out)], str(out / "report"))
    assert row(table(out), "Adam")[3] == "20.00"
    moved = tmp_path / "elsewhere"
    os.rename(out, moved)
    assert report_main([str(moved)]) == 0
    assert row(table(moved), "Adam")[3] == "20.00"
    runner.run_grid(grid(out, optimizers=("adam",)))
    # Negative control: other data in the data-bin the evaluation read is a change.
    data_bin = read_json(out / "runs" / "adam-seed1" / "results.json")["evaluation"]["data_bin"]
    with open(os.path.join(data_bin, "dict.en.txt"), "a") as f:
        f.write("extra 1\n")
    report.write_report([str(out)], str(out / "report"))
    assert row(table(out), "adam-seed1")[2].startswith(
        f"not current: evaluation out of date: {data_bin} holds other data"
    )


# --------------------------------------------------------------------------------------------
# Resuming a training that had finished
# --------------------------------------------------------------------------------------------


def test_a_training_that_reached_its_budget_is_not_resumed_beyond_it(stubbed, tmp_path):
    """The launcher killed (kill -9, Ctrl-C) after fairseq-train's last save: training.json still
    says running.  fairseq-train resumed there would take one more update (201 of 200)."""
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",)))
    run = out / "runs" / "adam-seed1"
    record = read_json(run / "training.json")
    (run / "training.json").write_text(json.dumps({**record, "status": "running"}))
    (run / "results.json").unlink()
    log = (run / "train.log").read_text()
    runner.run_grid(grid(out, optimizers=("adam",)))
    assert read_json(run / "checkpoints" / "checkpoint_last.pt")["updates"] == 20
    assert (run / "train.log").read_text() == log  # fairseq-train was not started
    assert read_json(run / "training.json")["status"] == "finished"
    assert read_json(run / "results.json")["checkpoint"]["num_updates"] == 20


def test_an_average_of_more_epochs_than_the_recipe_keeps_is_refused_before_any_work(
    stubbed, tmp_path
):
    out = tmp_path / "out"
    with pytest.raises(SettingError) as refused:
        runner.run_grid(grid(out, checkpoint="average:10"))
    message = str(refused.value)
    assert "--checkpoint average:10" in message and "--keep-last-epochs 5" in message
    assert "iwslt14_de_en/common.args" in message and "\n" not in message
    assert not (out / "runs").exists()
    runner.check_grid(grid(out, checkpoint="average:5"))  # what the recipe keeps: fine


# --------------------------------------------------------------------------------------------
# Ctrl-C anywhere: one line, status 130
# --------------------------------------------------------------------------------------------


def test_ctrl_c_during_the_data_preparation_of_a_fresh_out_is_one_line_and_130(
    stubbed, tmp_path, monkeypatch, capsys
):
    from fairseq_asam_experiments.cli import table4_main

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "prepare_data", interrupted)
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--optimizers", "adam", "--out", str(out)]
    assert table4_main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C)" in err and "no runs folder" not in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # Before the grid's own handling (the checks): the same.
    monkeypatch.setattr(runner, "check_grid", interrupted)
    assert table4_main(argv) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "interrupted (Ctrl-C)" in err


def test_the_report_of_a_grid_without_runs_yet_lists_them_as_not_started(stubbed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = grid(out, optimizers=("adam",))
    (out / "grid.json").write_text(json.dumps(runner.grid_record(config)))
    assert report_main([str(out)]) == 0
    assert row(table(out), "adam-seed1")[2] == "not started"
    assert report_main([str(tmp_path / "nowhere")]) == 1


# --------------------------------------------------------------------------------------------
# A corrupt record is its run's failure
# --------------------------------------------------------------------------------------------


def corrupt_and_run_again(tmp_path, record):
    """adam-seed1 trained and evaluated, its `record` truncated, then a grid of it and
    asam-seed1: adam-seed1 fails in planning, asam-seed1 is done anyway."""
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",)))
    (out / "runs" / "adam-seed1" / record).write_text('{"valid": ')  # truncated
    failed = r"1 run\(s\) failed: adam-seed1: plan: .*not valid JSON"
    with pytest.raises(runner.GridFailed, match=failed):
        runner.run_grid(grid(out, optimizers=("asam", "adam")))
    assert read_json(out / "runs" / "asam-seed1" / "results.json")["valid"]["bleu"] == 20.0
    return out


def test_a_corrupt_results_json_is_that_runs_failure_and_the_grid_goes_on(stubbed, tmp_path):
    out = corrupt_and_run_again(tmp_path, "results.json")
    assert "not valid JSON" in read_json(out / "runs" / "adam-seed1" / "failure.json")["error"]
    text = table(out)
    assert "not valid JSON" in row(text, "adam-seed1")[2]
    assert row(text, "Adam+ASAM")[3] == "20.00"
    # An unreadable failure record is said as such.
    (out / "runs" / "adam-seed1" / "failure.json").write_text("{")
    assert report_main([str(out)]) == 0
    assert row(table(out), "adam-seed1")[2].startswith("failed: ")
    assert "failure.json is not valid JSON" in row(table(out), "adam-seed1")[2]
    # The report alone, without the runner's failure record: the same.
    (out / "runs" / "adam-seed1" / "failure.json").unlink()
    (out / "runs" / "adam-seed1" / "training.json").write_text("{")
    assert report_main([str(out)]) == 0
    assert "not valid JSON" in row(table(out), "adam-seed1")[2]


# --------------------------------------------------------------------------------------------
# Seeds of an earlier invocation in the same folder
# --------------------------------------------------------------------------------------------


def test_a_seed_outside_the_grid_counts_but_never_hides_a_missing_grid_seed(stubbed, tmp_path):
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",), seeds=(4,)))  # an earlier --seeds 4
    set_mode(out, "adam-seed3", "fail")
    with pytest.raises(runner.GridFailed):
        runner.run_grid(grid(out, optimizers=("adam",), seeds=(1, 2, 3)))
    # Three results (seeds 1, 2, 4) for a grid of three seeds: seed 3's absence is still said.
    assert row(table(out), "Adam")[1] == "1,2,4 (n = 3; no result for seed 3 of the grid's 1,2,3)"
    # All of the grid's seeds there, plus an earlier one: nothing to say.
    set_mode(out, "adam-seed3", "ok")
    runner.run_grid(grid(out, optimizers=("adam",), seeds=(1, 2, 3)))
    assert row(table(out), "Adam")[1] == "1,2,3,4"


# --------------------------------------------------------------------------------------------
# Corrupt records seen by the runner and the cluster planner
# --------------------------------------------------------------------------------------------


def test_a_corrupt_training_record_fails_its_run_only(stubbed, tmp_path):
    corrupt_and_run_again(tmp_path, "training.json")


def test_one_folder_named_twice_is_one_grid(stubbed, tmp_path, monkeypatch):
    out = tmp_path / "out"
    runner.run_grid(grid(out, optimizers=("adam",)))
    monkeypatch.chdir(tmp_path)
    assert report_main(["out", str(out), "--out", str(tmp_path / "both")]) == 0
    text = (tmp_path / "both" / "table4.md").read_text()
    assert sum(line.startswith("| Adam |") for line in text.splitlines()) == 1
