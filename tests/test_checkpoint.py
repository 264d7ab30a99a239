"""Checkpoints: numpy-1 pickles under numpy 2, switching an Adam checkpoint to ASAM across
precisions (fairseq records the mixed-precision wrapper's class name, not Adam's), and LookSAM's
g_v saved and loaded through every wrapper."""

import importlib.util
import io
import os

import numpy as np
import pytest
import torch
from harness import StepRecorder, batches, build_trainer, emulate_flat_fp16_on_cpu

import fairseq_asam  # noqa: F401  (safe globals for fairseq checkpoints)
from fairseq_asam.optim import find_sharpness_aware
from fairseq_asam.optimizer_switch import CheckpointError, switch_optimizer

SWITCH_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "switch_optimizer.py")
NUMPY2_MULTIARRAY = b"numpy._core.multiarray"
NUMPY1_MULTIARRAY = b"numpy.core.multiarray"


@pytest.mark.skipif(not np.__version__.startswith("2"), reason="numpy 1 writes these names itself")
def test_numpy1_pickled_checkpoint_loads_under_numpy2():
    """A checkpoint saved under numpy 1 names numpy.core.multiarray.scalar/_reconstruct, which
    numpy 2 moved to numpy._core: torch's safe loader must accept the old names."""
    buffer = io.BytesIO()
    torch.save(
        {"extra_state": {"best": np.float64(35.1), "counts": np.arange(4)}},
        buffer,
        _use_new_zipfile_serialization=False,
    )  # the legacy format keeps names as plain text
    data = buffer.getvalue()
    assert data.count(NUMPY2_MULTIARRAY) == 2
    numpy1 = data.replace(NUMPY2_MULTIARRAY, NUMPY1_MULTIARRAY)
    loaded = torch.load(io.BytesIO(numpy1), map_location="cpu")  # weights_only by default
    assert float(loaded["extra_state"]["best"]) == 35.1
    assert loaded["extra_state"]["counts"].tolist() == [0, 1, 2, 3]
    # The safe loader is still on: another numpy.core name stays refused.
    other = data.replace(NUMPY2_MULTIARRAY + b"\nscalar", NUMPY1_MULTIARRAY + b"\nfromstring")
    with pytest.raises(Exception, match="weights_only|Weights only"):
        torch.load(io.BytesIO(other), map_location="cpu")


PRECISION_FLAGS = {
    "fp32": [],
    "fp16": ["--fp16"],
    "fp16-no-flatten": ["--fp16", "--fp16-no-flatten-grads"],
    "memory-efficient-fp16": ["--memory-efficient-fp16"],
    "amp": ["--amp"],
}
WRAPPER = {
    "fp32": None,
    "fp16": "FP16Optimizer",
    "fp16-no-flatten": "FP16Optimizer",
    "memory-efficient-fp16": "MemoryEfficientFP16Optimizer",
    "amp": "AMPOptimizer",
}
ADAM_UPDATES = 3


def _trainer(data_bin, optimizer, precision):
    flags = [
        "--optimizer",
        optimizer,
        "--fp16-init-scale",
        "128",
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "10",
    ]
    return build_trainer(data_bin, flags + PRECISION_FLAGS[precision])


def _adam_moments(trainer):
    """exp_avg of every model parameter, by the parameter's name, whatever the layout: flat
    --fp16 keeps one buffer holding the parameters one after another in the model's order."""
    named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    state = trainer.optimizer.state_dict()["state"]
    if len(state) == 1 < len(named):
        pieces = state[0]["exp_avg"].float().split([p.numel() for _, p in named])
    else:
        pieces = [state[i]["exp_avg"].reshape(-1).float() for i in range(len(named))]
    return {name: piece for (name, _), piece in zip(named, pieces)}


def _adam_checkpoint(data_bin, tmp_path, precision):
    trainer = _trainer(data_bin, "adam", precision)
    for sample in batches(trainer, ADAM_UPDATES):
        trainer.train_step([sample])
    path = str(tmp_path / f"adam-{precision}.pt")
    trainer.consolidate_optimizer()  # as fairseq's checkpoint_utils does before saving
    trainer.save_checkpoint(path, {})
    return path, _adam_moments(trainer)


@pytest.mark.slow
@pytest.mark.parametrize(
    "source,target",
    [
        ("fp16-no-flatten", None),  # fp16 Adam → fp16 ASAM: the recorded name stays FP16Optimizer
        ("fp32", "amp"),
        ("fp32", "memory-efficient-fp16"),
        ("fp32", "fp16"),  # flat: Adam's per-parameter moments are flattened
        ("fp16", None),
    ],
)
def test_switch_keeps_adam_state_across_precisions(data_bin, tmp_path, source, target):
    with emulate_flat_fp16_on_cpu():
        path, moments = _adam_checkpoint(data_bin, tmp_path, source)
        switched = str(tmp_path / "asam.pt")
        target_precision = target or source
        before, after = switch_optimizer(
            path, switched, "asam", None if target is None else target.replace("-no-flatten", "")
        )
        assert before == (WRAPPER[source] or "FairseqAdam")
        assert after == (WRAPPER[target_precision] or "FairseqASAM")
        trainer = _trainer(data_bin, "asam", target_precision)
        trainer.load_checkpoint(switched)  # fairseq's own resume check passes
        assert trainer.get_num_updates() == ADAM_UPDATES
        loaded = _adam_moments(trainer)  # Adam's moments, in the new layout, by parameter
        assert loaded.keys() == moments.keys()
        assert all(torch.equal(loaded[name], moments[name]) for name in moments)
        assert trainer.get_lr() == pytest.approx(
            1e-3 * ADAM_UPDATES / 10, rel=1e-6
        )  # warm-up goes on
        log = trainer.train_step(batches(trainer, ADAM_UPDATES + 1)[-1:])
        assert trainer.get_num_updates() == ADAM_UPDATES + 1 and "sharpness" in log


@pytest.mark.slow
def test_switch_refuses_what_cannot_resume(data_bin, tmp_path, capsys):
    with emulate_flat_fp16_on_cpu():
        flat, _ = _adam_checkpoint(data_bin, tmp_path, "fp16")
    with pytest.raises(CheckpointError, match="flat --fp16"):
        switch_optimizer(flat, str(tmp_path / "x.pt"), "asam", "fp32")
    trainer = build_trainer(data_bin, ["--optimizer", "sgd", "--fp16", "--fp16-no-flatten-grads"])
    trainer.train_step(batches(trainer, 1))
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(str(tmp_path / "sgd.pt"), {})
    with pytest.raises(CheckpointError, match="FP16Optimizer around --optimizer sgd"):
        switch_optimizer(str(tmp_path / "sgd.pt"), str(tmp_path / "x.pt"), "asam")
    assert not (tmp_path / "x.pt").exists()
    # The script says it in one line naming the flag, and writes nothing (its main in process).
    spec = importlib.util.spec_from_file_location("switch_optimizer_script", SWITCH_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [flat, str(tmp_path / "x.pt"), "--optimizer", "asam", "--fp32"]
    assert script.main(argv) == 1
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1].startswith("switch_optimizer.py: error: ")
    assert "resume it with --fp16" in stderr and not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_switch_under_bmuf_keeps_the_recorded_name(data_bin, tmp_path):
    """fairseq records FairseqBMUF whatever it wraps: Adam → ASAM needs no rename."""
    flags = ["--use-bmuf", "--distributed-world-size", "1", "--lr", "1e-3"]
    adam = build_trainer(data_bin, ["--optimizer", "adam"] + flags)
    for sample in batches(adam, 2):
        adam.train_step([sample])
    adam.consolidate_optimizer()
    adam.save_checkpoint(str(tmp_path / "adam.pt"), {})
    assert switch_optimizer(str(tmp_path / "adam.pt"), str(tmp_path / "asam.pt"), "asam") == (
        "FairseqBMUF",
        "FairseqBMUF",
    )
    asam = build_trainer(data_bin, ["--optimizer", "asam"] + flags)
    asam.load_checkpoint(str(tmp_path / "asam.pt"))
    assert asam.get_num_updates() == 2
    assert "sharpness" in asam.train_step(batches(asam, 3)[-1:])
    with pytest.raises(CheckpointError, match="--use-bmuf"):
        switch_optimizer(str(tmp_path / "adam.pt"), str(tmp_path / "x.pt"), "asam", "amp")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "memory-efficient-fp16", "amp", "bmuf"])
def test_looksam_g_v_is_saved_and_loaded_through_every_wrapper(data_bin, tmp_path, precision):
    """fairseq saves the outermost optimizer's state_dict (AMPOptimizer's is torch's own, past
    the plugin's class): g_v must be in it and come back on load, so the next plain update
    reuses it exactly as the uninterrupted trainer does."""
    flags = ["--optimizer", "asam", "--sam-interval", "2", "--looksam-alpha", "0.5"]
    flags += ["--fp16-init-scale", "128", "--lr", "1e-3"]
    bmuf = ["--use-bmuf", "--distributed-world-size", "1"]
    flags += bmuf if precision == "bmuf" else PRECISION_FLAGS[precision]
    with emulate_flat_fp16_on_cpu():
        straight = build_trainer(data_bin, flags)
        samples = batches(straight, 2)
        straight.train_step(samples[:1])  # update 0, sharpness-aware: keeps g_v
        path = str(tmp_path / "looksam.pt")
        straight.consolidate_optimizer()
        straight.save_checkpoint(path, {})
        resumed = build_trainer(data_bin, flags)
        resumed.load_checkpoint(path)
        saved, loaded = (find_sharpness_aware(t.optimizer)._g_v for t in (straight, resumed))
        assert saved is not None and loaded is not None and torch.equal(loaded, saved)
        recorders = [StepRecorder(t) for t in (straight, resumed)]
        for trainer in (straight, resumed):
            trainer.train_step(samples[1:])  # update 1, plain: adds the reuse term
    # Adam's input, not the weights: --fp16 rebuilds its fp32 master weights from the fp16 ones.
    assert all(torch.equal(a, b) for a, b in zip(recorders[0].grads, recorders[1].grads))
