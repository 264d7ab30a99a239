"""Stand-ins for fairseq-train, fairseq-generate and fairseq-asam-sharpness, so that the tests of
the Table 4 runner's own logic (stage records, failures, locks, Ctrl-C) run in seconds.

* `python runner_stubs.py train DATA --save-dir D --max-update N --seed S ...` is the trainer:
  it continues from `D/checkpoint_last.pt` if there is one (a JSON file here, not a torch
  checkpoint), "trains" to N updates, logs fairseq-style json lines and writes
  checkpoint_last.pt, checkpoint_best.pt and checkpoint<epoch>.pt holding {"updates", "seed",
  "resumed_from"}.  A file `stub.mode` in the run folder (D/..) changes what it does:
  `fail` (exit status 1), `kill` (killed by SIGKILL), `sleep` (appends its pid to
  `stub.started`, then waits for a signal, 30 s at most; on SIGINT it exits with status 130
  like Python), `slow` (appends its pid to `stub.started`, then trains 0.2 s per update and
  writes checkpoint_last.pt after each, as fairseq's --save-interval-updates 1 would; on SIGINT
  it exits with status 130).
* `fake_checkpoint_position` replaces evaluation.checkpoint_position (the update count of a
  stub checkpoint).
* `fake_evaluate` replaces evaluation.evaluate_checkpoint: valid BLEU = the checkpoint's updates,
  test BLEU = updates + seed / 10, so that a test sees which checkpoint was scored.
* `SHARPNESS_COMMAND` replaces the runner's fairseq-asam-sharpness command: it writes its own
  command line and CUDA_VISIBLE_DEVICES into the --json file.
* `python runner_stubs.py launch OUT MAX_UPDATE OPTIMIZERS` runs a grid with these stubs (the
  Ctrl-C and two-launcher tests start it as a separate process).
* `StubGridConfig` is a GridConfig whose runs use these stubs in any process it is unpickled in:
  a submitit job (experiments.cluster) gets it pickled, with this folder on PYTHONPATH.
"""

import json
import os
import signal
import sys
import time

STUB = os.path.abspath(__file__)
MODE_FILE, STARTED_FILE = "stub.mode", "stub.started"
SLEEP_SECONDS = 30
SLOW_UPDATE_SECONDS = 0.2


def _option(argv, flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def train_main(argv):
    save_dir = _option(argv, "--save-dir")
    run_dir = os.path.dirname(save_dir)
    max_update = int(_option(argv, "--max-update"))
    seed = int(_option(argv, "--seed"))
    mode_path = os.path.join(run_dir, MODE_FILE)
    mode = open(mode_path).read().strip() if os.path.exists(mode_path) else "ok"
    if mode == "fail":
        print("stub trainer: failing as asked", flush=True)
        return 1
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os.makedirs(save_dir, exist_ok=True)
    last = os.path.join(save_dir, "checkpoint_last.pt")
    start = 0
    if os.path.exists(last):
        with open(last) as f:
            start = json.load(f)["updates"]
        print(f"stub trainer: Loaded checkpoint {last} (epoch 1 @ {start} updates)", flush=True)
    if mode == "slow":
        with open(os.path.join(run_dir, STARTED_FILE), "a") as f:
            f.write(f"{os.getpid()}\n")
        try:
            for updates in range(start + 1, max_update + 1):
                time.sleep(SLOW_UPDATE_SECONDS)
                state = {"updates": updates, "seed": seed, "resumed_from": start}
                with open(last + ".tmp", "w") as f:
                    json.dump(state, f)
                os.replace(last + ".tmp", last)
                print(f"stub trainer: update {updates}", flush=True)
        except KeyboardInterrupt:
            print("stub trainer: interrupted", flush=True)
            return 130
    if mode == "sleep":
        with open(os.path.join(run_dir, STARTED_FILE), "a") as f:
            f.write(f"{os.getpid()}\n")
        try:
            time.sleep(SLEEP_SECONDS)  # a test that fails never waits longer
        except KeyboardInterrupt:
            print("stub trainer: interrupted", flush=True)
            return 130
        print("stub trainer: nobody stopped me", flush=True)
        return 1
    # fairseq-train takes one update before it checks --max-update: a run resumed at its
    # budget ends one update beyond it.
    end = max(max_update, start + 1)
    for updates in range(start + 1, end + 1):
        record = {"num_updates": str(updates), "loss": str(10.0 / updates)}
        if "--optimizer" in argv and _option(argv, "--optimizer") != "adam":
            record["sharpness"] = str(0.5 / updates)
        print(f"2026-01-01 00:00:00 | INFO | train_inner | {json.dumps(record)}", flush=True)
    valid = {"valid_loss": str(10.0 / end), "valid_num_updates": str(end)}
    print(f"2026-01-01 00:00:00 | INFO | valid | {json.dumps(valid)}", flush=True)
    state = {"updates": end, "seed": seed, "resumed_from": start}
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", f"checkpoint{end}.pt"):
        with open(os.path.join(save_dir, name), "w") as f:
            json.dump(state, f)
    return 0


def fake_checkpoint_position(path):
    """evaluation.checkpoint_position of a stub checkpoint (a JSON file)."""
    with open(path) as f:
        return {"epoch": None, "num_updates": json.load(f)["updates"]}


def fake_evaluate(data_bin, save_dir, user_dir, choice, *args, **kwargs):
    """evaluation.evaluate_checkpoint without fairseq-generate (same result shape)."""
    from fairseq_asam_experiments import evaluation

    if hasattr(evaluation, "evaluation_settings"):
        settings = evaluation.evaluation_settings(
            data_bin, save_dir, choice, references=kwargs.get("references")
        )
        path = evaluation.checkpoint_inputs(save_dir, choice)[0]
    else:  # the runner before stage records (to see the tests fail there)
        settings = {"fingerprint": None}
        name = "checkpoint_last.pt" if str(choice) == "last" else "checkpoint_best.pt"
        path = os.path.join(save_dir, name)
    with open(path) as f:
        state = json.load(f)
    signature = "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:stub"
    return {
        "protocol": str(choice),
        "evaluation": settings,
        "checkpoint": {
            "choice": str(choice),
            "path": path,
            "sources": [path],
            "num_updates": state["updates"],
        },
        "beam": 5,
        "scored_splits": ["valid", "test"],
        "valid": {
            "bleu": float(state["updates"]),
            "sacrebleu": 1.0,
            "sacrebleu_signature": signature,
        },
        "test": {
            "bleu": state["updates"] + state["seed"] / 10,
            "sacrebleu": 2.0,
            "sacrebleu_signature": signature,
        },
    }


SHARPNESS_COMMAND = (
    sys.executable,
    "-c",
    "import json, os, sys; argv = sys.argv[1:]; "
    "json.dump({'argv': argv, 'cuda_visible_devices': os.environ.get('CUDA_VISIBLE_DEVICES'), "
    "'checkpoint': argv[0], 'estimates': [{'measure': 'adaptive', 'sharpness': 0.25}]}, "
    "open(argv[argv.index('--json') + 1], 'w'))",
)


def fake_data_bin(folder):
    """A folder that passes evaluation.check_data_bin (the stubs never read it)."""
    os.makedirs(folder, exist_ok=True)
    for name in ("dict.de.txt", "dict.en.txt", "valid.de-en.de.idx", "test.de-en.de.idx"):
        open(os.path.join(folder, name), "w").close()
    return folder


def install(runner, set_attribute=setattr, train=True):
    """Points `runner` at the stubs: its trainer (`train`), evaluation and sharpness command.
    `set_attribute`: a test's monkeypatch.setattr, which undoes it; the builtin setattr in a
    throw-away process."""
    original = runner.train_command

    def stub_command(*args, **kwargs):
        return [sys.executable, STUB, "train"] + original(*args, **kwargs)[3:]

    if train:
        set_attribute(runner, "train_command", stub_command)
    set_attribute(runner, "SHARPNESS_COMMAND", SHARPNESS_COMMAND)
    set_attribute(runner.evaluation, "evaluate_checkpoint", fake_evaluate)
    set_attribute(runner.evaluation, "checkpoint_position", fake_checkpoint_position)


def tiny_grid(runner, out, max_update=20, optimizers=("adam", "asam"), seeds=(1,), **kwargs):
    return runner.GridConfig(
        out_dir=str(out),
        preset=runner.TABLE4_PRESETS["tiny"],
        optimizers=tuple(optimizers),
        seeds=tuple(seeds),
        data_bin=fake_data_bin(os.path.join(str(out), "data-bin")),
        max_update=max_update,
        gpus=kwargs.pop("gpus", []),
        **kwargs,
    )


def _stub_config_class():
    import dataclasses

    from fairseq_asam_experiments import runner

    @dataclasses.dataclass
    class StubGridConfig(runner.GridConfig):
        """A GridConfig whose runs use the stubs, here and wherever it is unpickled."""

        def __setstate__(self, state):
            if os.environ.get("SUBMITIT_EXECUTOR"):  # in a job's own process only: no leak
                install(runner)
            self.__dict__.update(state)

        def command(self, run, data_bin=None):
            command = super().command(run, data_bin)
            return [sys.executable, STUB, "train"] + command[3:]

    StubGridConfig.__module__ = __name__
    StubGridConfig.__qualname__ = "StubGridConfig"
    return StubGridConfig


def __getattr__(name):
    if name == "StubGridConfig":
        cls = globals().get("_StubGridConfig") or _stub_config_class()
        globals()["_StubGridConfig"] = cls
        return cls
    raise AttributeError(name)


def stub_grid(out, max_update=20, optimizers=("adam", "asam"), seeds=(1,), **kwargs):
    """tiny_grid as a StubGridConfig (its runs use the stubs in a submitit job too)."""
    from fairseq_asam_experiments import runner

    cls = __getattr__("StubGridConfig")
    return cls(
        out_dir=str(out),
        preset=runner.TABLE4_PRESETS["tiny"],
        optimizers=tuple(optimizers),
        seeds=tuple(seeds),
        data_bin=fake_data_bin(os.path.join(str(out), "data-bin")),
        max_update=max_update,
        gpus=kwargs.pop("gpus", []),
        **kwargs,
    )


def launch_main(argv):
    """A launcher with the stubs: OUT MAX_UPDATE OPTIMIZERS; exit status as the console command."""
    import logging

    from fairseq_asam_experiments import runner

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
    out, max_update, optimizers = argv[0], int(argv[1]), argv[2].split(",")
    install(runner)
    config = tiny_grid(runner, out, max_update, optimizers)
    try:
        runner.run_grid(config)
    except runner.ExperimentError as error:
        print(f"launcher: error: {error}", file=sys.stderr, flush=True)
        return getattr(error, "exit_status", 1)
    return 0


def launch_jobs_main(argv):
    """OUT OPTIMIZERS: the grid through submitit-local (one job at a time); exit status as the
    console command.  Its jobs import this module: the caller puts this folder on PYTHONPATH."""
    import logging

    from fairseq_asam_experiments import cluster, runner

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
    out, optimizers = argv[0], argv[1].split(",")
    config = stub_grid(out, 20, optimizers)
    try:
        cluster.submit_grid(
            config, "submitit-local", cluster.JobOptions(time_min=10, max_concurrent=1)
        )
    except runner.ExperimentError as error:
        print(f"launcher: error: {error}", file=sys.stderr, flush=True)
        return getattr(error, "exit_status", 1)
    return 0


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    mains = {"train": train_main, "launch": launch_main, "launch-jobs": launch_jobs_main}
    sys.exit(mains[command](rest))
