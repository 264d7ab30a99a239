"""Stand-ins for fairseq-train, the evaluation and fairseq-asam-sharpness, so that the launcher's
own logic (stamps, resume, failures, locks, Ctrl-C, jobs) is tested in seconds; test_table4.py
runs the real thing.

* `python launch_stubs.py train DATA --save-dir D --max-update N --lr X ...` is the trainer: it
  starts from D/checkpoint_last.pt (a JSON {"updates", "lr"} here) and "trains" to N, printing
  `stub: update k lr X` and `stub: resumed from k` lines.  A file `stub.mode` in the run folder
  changes it: `fail` (exit status 1), `kill` (SIGKILL to itself), `sleep` (its pid to
  `stub.started`, then waits for SIGINT: `stub: interrupted`, status 130).
* `install(setattr)` points launch at the stubs: its evaluation (valid BLEU = the checkpoint's
  updates, each call appended to `stub.evaluations`) and its sharpness command.
* `StubGrid`: a Grid whose runs train with the stub, here and in a submitit job (unpickled there,
  it installs the stubs in that process).
* `python launch_stubs.py launch OUT MAX_UPDATE ROWS`: launch_local over a StubGrid with
  table4's ending (status 130 on Ctrl-C), for the tests that need a launcher process.
"""

import dataclasses
import json
import os
import signal
import sys
import time

STUB = os.path.abspath(__file__)
MODE_FILE, STARTED_FILE, EVALUATIONS_FILE = "stub.mode", "stub.started", "stub.evaluations"
LAST = "checkpoint_last.pt"


def _option(argv, flag):
    return argv[argv.index(flag) + 1]


def train_main(argv) -> int:
    save_dir = _option(argv, "--save-dir")
    run_dir = os.path.dirname(save_dir)
    mode_path = os.path.join(run_dir, MODE_FILE)
    mode = open(mode_path).read().strip() if os.path.exists(mode_path) else "ok"
    if mode == "fail":
        print("stub: failing as asked", flush=True)
        return 1
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "sleep":
        with open(os.path.join(run_dir, STARTED_FILE), "a") as f:
            f.write(f"{os.getpid()}\n")
        try:
            time.sleep(60)  # a test that fails never waits longer
        except KeyboardInterrupt:
            print("stub: interrupted", flush=True)
            return 130
        return 1
    os.makedirs(save_dir, exist_ok=True)
    last = os.path.join(save_dir, LAST)
    start = json.load(open(last))["updates"] if os.path.exists(last) else 0
    print(f"stub: resumed from {start}", flush=True)
    lr = _option(argv, "--lr")
    for update in range(start + 1, int(_option(argv, "--max-update")) + 1):
        print(f"stub: update {update} lr {lr}", flush=True)
    with open(last, "w") as f:
        json.dump({"updates": max(start, int(_option(argv, "--max-update"))), "lr": lr}, f)
    return 0


if __name__ == "__main__" and sys.argv[1] == "train":  # the trainer: no kit to import
    sys.exit(train_main(sys.argv[2:]))

from fairseq_asam_experiments import evaluation, grid, launch  # noqa: E402


def _last(save_dir):
    with open(os.path.join(save_dir, LAST)) as f:
        return json.load(f)


def evaluation_inputs(data_bin, save_dir, choice, references=None):
    return {"choice": str(choice), "updates": _last(save_dir)["updates"]}


def evaluate_checkpoint(data_bin, save_dir, user_dir, choice, output_dir=None, **kwargs):
    state = _last(save_dir)
    with open(os.path.join(output_dir, EVALUATIONS_FILE), "a") as f:
        f.write(f"{state['updates']}\n")
    checkpoint = {"path": os.path.join(save_dir, LAST), "num_updates": state["updates"]}
    scores = {"bleu": float(state["updates"]), "sacrebleu": 1.0, "sacrebleu_signature": "stub"}
    return {"checkpoint": checkpoint, "valid": scores, "test": {**scores, "bleu": 0.5}}


SHARPNESS_COMMAND = (
    sys.executable,
    "-c",
    "import json, sys; argv = sys.argv[1:]; json.dump({'argv': argv, 'estimates': [{'measure': "
    "'adaptive', 'sharpness': 0.25}]}, open(argv[argv.index('--json') + 1], 'w'))",
)


def install(set_attribute=setattr):
    set_attribute(evaluation, "evaluation_inputs", evaluation_inputs)
    set_attribute(evaluation, "evaluate_checkpoint", evaluate_checkpoint)
    set_attribute(launch, "SHARPNESS_COMMAND", SHARPNESS_COMMAND)


@dataclasses.dataclass
class StubGrid(grid.Grid):
    """A Grid whose runs use the stubs, here and wherever it is unpickled (a submitit job)."""

    def command(self, run, data_bin):
        return [sys.executable, STUB, "train"] + super().command(run, data_bin)[3:]

    def __setstate__(self, state):
        if os.environ.get("SUBMITIT_EXECUTOR"):  # in a job's own process only
            install()
        self.__dict__.update(state)


def stub_grid(out, max_update=4, rows=("adam",), **kwargs):
    return StubGrid(
        str(out), grid.PRESETS["tiny"], rows=tuple(rows), max_update=max_update, **kwargs
    )


def launch_main(argv) -> int:
    from fairseq_asam_experiments.cli import run_command
    from fairseq_asam_experiments.table4 import ending

    install()
    out, max_update, rows = argv[0], int(argv[1]), argv[2].split(",")
    stubbed = stub_grid(out, max_update, rows)
    runs = stubbed.runs()
    data_bin = os.path.join(out, "data-bin")

    def work():
        launch.check_runs(stubbed, data_bin)
        return ending(launch.launch_local(stubbed, runs, data_bin, {}, []))

    return run_command("launcher", work)


if __name__ == "__main__":
    sys.exit(launch_main(sys.argv[2:]))
