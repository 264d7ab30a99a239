"""Shared test helpers: a tiny Transformer on a generated corpus, built through fairseq's own
option parser and Trainer, and the reference update written straight from the equations."""

import argparse
import contextlib
import copy
import datetime
import glob
import importlib
import json
import math
import os
import pathlib
import pickle
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fairseq_asam
from fairseq_asam_experiments import recipe, synthetic_data

# The shipped hydra configs (fairseq-hydra-train --config-dir).
HYDRA_DIR = os.path.join(recipe.config_dir(), recipe.HYDRA_CONFIG_DIR)

TINY_TRANSFORMER = [
    "--arch",
    "transformer",
    "--encoder-layers",
    "1",
    "--decoder-layers",
    "1",
    "--encoder-embed-dim",
    "16",
    "--decoder-embed-dim",
    "16",
    "--encoder-ffn-embed-dim",
    "32",
    "--decoder-ffn-embed-dim",
    "32",
    "--encoder-attention-heads",
    "2",
    "--decoder-attention-heads",
    "2",
    "--dropout",
    "0",
    "--attention-dropout",
    "0",
    "--activation-dropout",
    "0",
]
LANGUAGE_PAIR = ["--source-lang", "de", "--target-lang", "en"]
BASE_ARGS = TINY_TRANSFORMER + [
    "--task",
    "translation",
    *LANGUAGE_PAIR,
    "--criterion",
    "label_smoothed_cross_entropy",
    "--label-smoothing",
    "0.1",
    "--lr",
    "1e-3",
    "--max-tokens",
    "120",
    "--seed",
    "3",
    "--num-workers",
    "0",
]


@contextlib.contextmanager
def emulate_flat_fp16_on_cpu():
    """Lets fairseq's flat --fp16 (FP16Optimizer with one flat fp32 master copy) run on the CPU.

    fairseq asks CUDA for the device of the flat buffer and keys the buffer by that index,
    matching parameters by `p.device.index`, which is None for CPU tensors.  Answering None
    makes the whole flat path — flattening, unscaling, overflow check, Adam on the flat buffer,
    copy back to the fp16 weights — run for real on CPU tensors.
    """
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: None
    try:
        yield
    finally:
        torch.cuda.current_device = original


def make_data_bin(root: str, train: int = 120, valid: int = 24) -> str:
    text = synthetic_data.write_corpus(os.path.join(root, "text"), {"train": train, "valid": valid})
    return synthetic_data.binarize(text, os.path.join(root, "data-bin"))


_PARSED_CFGS = {}  # argv -> the pickled cfg


def parse_cfg(data_bin: str, extra, device: str = "cpu", language_pair: bool = True):
    """fairseq-train's cfg of the tiny model, as fairseq makes it of the argv (with
    `compose_by_difference`); without `language_pair`, no -s/-t (as fairseq's IWSLT'14 example
    trains: the task infers the pair from the data folder).  A fresh copy on every call."""
    device_args = ["--cpu"] if device == "cpu" else []
    base = BASE_ARGS if language_pair else [a for a in BASE_ARGS if a not in LANGUAGE_PAIR]
    argv = [data_bin, "--user-dir", fairseq_asam.USER_DIR] + base + device_args + list(extra)
    key = tuple(argv)
    if key not in _PARSED_CFGS:
        _PARSED_CFGS[key] = pickle.dumps(training_cfg(argv, compose=compose_by_difference))
    return pickle.loads(_PARSED_CFGS[key])


def training_cfg(argv, compose=None):
    """fairseq-train's cfg of `argv`: its parser, then convert_namespace_to_omegaconf, whose
    hydra compose is `compose` if given."""
    from fairseq import options
    from fairseq.dataclass import utils as dataclass_utils

    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    if compose is None:
        return dataclass_utils.convert_namespace_to_omegaconf(args)
    real, dataclass_utils.compose = dataclass_utils.compose, compose
    try:
        return dataclass_utils.convert_namespace_to_omegaconf(args)
    finally:
        dataclass_utils.compose = real


# fairseq composes hydra's config with one override per field of every config group (about 500),
# 0.8 s a cfg; the suite makes about 80, which differ in a few values.  The first cfg of each set
# of group choices (task=, optimizer=, ...) is composed by hydra; a later one is a copy of it with
# only the overrides that differ applied: each parsed by hydra's override parser and set on the
# typed node, as compose sets it.  tests/test_harness.py checks it against fairseq's own cfg.
_COMPOSED = {}  # the group choices -> (their overrides, the composed config)


def compose_by_difference(config_name, overrides, strict=False):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.experimental import compose
    from omegaconf import OmegaConf

    groups = tuple(o for o in overrides if "." not in o.split("=", 1)[0])
    first = _COMPOSED.get(groups)
    keys = [o.split("=", 1)[0] for o in overrides]
    if first is None or keys != [o.split("=", 1)[0] for o in first[0]]:
        composed = compose(config_name, overrides=overrides, strict=strict)
        _COMPOSED.setdefault(groups, (list(overrides), copy.deepcopy(composed)))
        return composed
    cfg = copy.deepcopy(first[1])
    changed = [o for o, was in zip(overrides, first[0]) if o != was]
    for override in OverridesParser.create().parse_overrides(changed):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return cfg


def build_trainer(
    data_bin: str,
    extra=(),
    wrap_model=None,
    bf16=False,
    device="cpu",
    make_criterion=None,
    wrap_criterion=None,
    language_pair=True,
):
    """fairseq Trainer for the tiny model; `wrap_model(model)` installs a DDP wrapper.

    `bf16` sets common.bf16 alone, as fairseq-hydra-train does (fairseq-train's --bf16 is TPU).
    `device` "cuda" trains on the current GPU (scripts/gpu_check.sh).  `make_criterion(task)`
    replaces the configured criterion; `wrap_criterion(criterion)` installs its DDP wrapper.
    `language_pair=False` trains without -s/-t (see parse_cfg).
    """
    from fairseq import tasks
    from fairseq.trainer import Trainer

    cfg = parse_cfg(data_bin, extra, device, language_pair)
    cfg.common.bf16 = bf16
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    torch.manual_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    criterion = (
        task.build_criterion(cfg.criterion) if make_criterion is None else make_criterion(task)
    )
    trainer = Trainer(cfg, task, model, criterion)
    if wrap_model is not None:
        trainer._wrapped_model = wrap_model(model)
    if wrap_criterion is not None:
        trainer._wrapped_criterion = wrap_criterion(criterion)
    return trainer


def batches(trainer, count: int, shard_id: int = 0, num_shards: int = 1):
    """The first `count` training batches, in a fixed order, moved to the trainer's device."""
    task = trainer.task
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"),
        max_tokens=trainer.cfg.dataset.max_tokens,
        seed=1,
        num_shards=num_shards,
        shard_id=shard_id,
        disable_iterator_cache=True,  # the task would otherwise hand back the first shard's
    ).next_epoch_itr(shuffle=False)
    out = []
    for sample in itr:
        out.append(sample)
        if len(out) == count:
            break
    assert len(out) == count, "toy corpus too small for the requested batches"
    return out


class StepRecorder:
    """Records what the base optimizer (torch Adam) receives: weights and gradients."""

    def __init__(self, trainer):
        self.weights, self.grads = None, None
        torch_optimizer = trainer.optimizer.optimizer
        plain_step = torch_optimizer.step

        def step(*args, **kwargs):
            params = [p for g in torch_optimizer.param_groups for p in g["params"]]
            self.weights = [p.detach().clone() for p in params]
            # Optimizers that "step with scale" (apex's FusedAdamV1) get the unscaling factor
            # instead of unscaled gradients.
            scale = float(kwargs.get("scale", 1.0))
            self.grads = [p.grad.detach().clone() / scale for p in params]
            return plain_step(*args, **kwargs)

        torch_optimizer.step = step


def reference_update_gradient(
    model,
    criterion,
    samples,
    rho,
    eta,
    adaptive,
    normalize_biases=False,
    world_samples=None,
    sample_size=None,
):
    """Σ_B ∇L_B(w + ε_B) / Σ_B sample_size, with ε_B = ρ T² g_B / ‖T g_B‖ — from the equations.

    `world_samples`: per-worker lists of micro-batches (DDP); defaults to one worker.
    `sample_size`: the denominator when it is not Σ_B sample_size: fairseq zeroes the sample
    size of a worker whose last micro-batch is a dummy batch, while the gradients of that
    worker's real micro-batches are still all-reduced.
    The returned list follows model.named_parameters().
    """
    total, summed_size = None, 0.0
    for worker in world_samples or [samples]:
        for sample in worker:
            step = reference_micro_batch(
                model, criterion, sample, rho, eta, adaptive, normalize_biases
            )
            if total is None:
                total = [torch.zeros_like(g) for g in step.perturbed_grad]
            with torch.no_grad():
                for tot, gi in zip(total, step.perturbed_grad):
                    tot += gi
            summed_size += step.sample_size
    return [t / (summed_size if sample_size is None else sample_size) for t in total]


class ReferenceStep:
    """One micro-batch of the update rule: losses at w and w + ε, ∇L(w + ε), the sample size."""

    def __init__(self, loss, perturbed_loss, perturbed_grad, sample_size):
        self.loss, self.perturbed_loss = loss, perturbed_loss
        self.perturbed_grad, self.sample_size = perturbed_grad, sample_size


def reference_micro_batch(
    model, criterion, sample, rho, eta, adaptive, normalize_biases=False, train_mode=True
):
    """ε = ρ T² g / ‖T g‖ from g = ∇L(w); L and ∇L at w + ε (train mode, or eval mode: no
    dropout).  `model` is left as it was: its weights are restored bit for bit (cheaper than a
    copy of the model per micro-batch)."""
    was_training = model.training
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    w = [p.detach().clone() for p in params]
    model.train(train_mode)
    try:
        return _reference_micro_batch(
            model, criterion, sample, rho, eta, adaptive, normalize_biases, names, params, w
        )
    finally:
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
        model.train(was_training)


def _reference_micro_batch(
    model, criterion, sample, rho, eta, adaptive, normalize_biases, names, params, w
):
    loss, size, _ = criterion(model, sample)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)]
    scale = [
        (wi.abs() + eta)
        if adaptive and ("weight" in n or normalize_biases)
        else torch.ones_like(wi)
        for n, wi in zip(names, w)
    ]
    norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(scale, g)))
    with torch.no_grad():
        for p, wi, t, gi in zip(params, w, scale, g):
            p.copy_(wi + rho * t * t * gi / norm)
    loss2, _, _ = criterion(model, sample)
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    g2 = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g2)]
    return ReferenceStep(float(loss.detach()), float(loss2.detach()), g2, float(size))


def reference_logged_sharpness(model, criterion, samples, rho, eta, adaptive, train_mode=True):
    """The `sharpness` metric from the equations: Σ_B (L_B(w + ε_B) − L_B(w)) / Σ_B sample_size,
    in base 2 like fairseq's logged `loss` (`train_mode` False: `sharpness_eval`, no dropout)."""
    steps = [
        reference_micro_batch(model, criterion, s, rho, eta, adaptive, train_mode=train_mode)
        for s in samples
    ]
    rise = sum(s.perturbed_loss - s.loss for s in steps)
    return rise / sum(s.sample_size for s in steps) / math.log(2)


def one_step_reference(model, batches, loss_fn, rho, eta, adaptive):
    """(L(w), L(w + ε)) with ε = ρ T² g / ‖T g‖₂, g = ∇L(w) over `batches`, T = |w| + η on the
    tensors named `weight` (T = 1 on the others; SAM: T = 1), written from the equations; L is
    a sharpness LossFn's mean (Σ loss / Σ sample size), in eval mode."""
    model = copy.deepcopy(model).eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = [torch.zeros_like(p) for p in params]
    loss_sum, size = 0.0, 0.0
    for batch in batches:
        loss, batch_size = loss_fn(model, batch)
        for total, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                total += g
        loss_sum, size = loss_sum + float(loss.detach()), size + float(batch_size)
    with torch.no_grad():
        scales = [
            p.abs() + eta if adaptive and "weight" in n else torch.ones_like(p) for n, p in named
        ]
        norm = torch.sqrt(sum(((t * g / size) ** 2).sum() for t, g in zip(scales, grads)))
        for p, t, g in zip(params, scales, grads):
            p += rho * t * t * (g / size) / norm
        perturbed = sum(float(loss_fn(model, batch)[0]) for batch in batches) / size
    return loss_sum / size, perturbed


def read_generate_output(path):
    """{sentence id: (first hypothesis, reference)} of a fairseq-generate output, read here."""
    hypotheses, references = {}, {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if fields[0].startswith("H-"):
                hypotheses.setdefault(int(fields[0][2:]), fields[2])
            elif fields[0].startswith("T-"):
                references[int(fields[0][2:])] = fields[1]
    assert set(hypotheses) == set(references)
    return {i: (hypotheses[i], references[i]) for i in sorted(hypotheses)}


def independent_scores(generate_file, raw_lines):
    """(tokenized BLEU, detokenized sacreBLEU against `raw_lines`, sentences) by sacreBLEU alone:
    corpus BLEU-4 without tokenization or smoothing is fairseq-generate's tokenized BLEU."""
    import sacrebleu
    from sacremoses import MosesDetokenizer

    pairs = read_generate_output(generate_file)
    hypotheses = [h for h, _ in pairs.values()]
    bleu = sacrebleu.corpus_bleu(
        hypotheses,
        [[r for _, r in pairs.values()]],
        tokenize="none",
        smooth_method="none",
        force=True,
    ).score
    sacre = None
    if raw_lines is not None:
        detokenizer = MosesDetokenizer(lang="en")
        detokenized = [detokenizer.detokenize(h.split()) for h in hypotheses]
        sacre = sacrebleu.corpus_bleu(detokenized, [[raw_lines[i] for i in pairs]]).score
    return bleu, sacre, len(pairs)


def relative_error(actual, expected) -> float:
    diff = torch.sqrt(sum(((a.double() - e.double()) ** 2).sum() for a, e in zip(actual, expected)))
    norm = torch.sqrt(sum((e.double() ** 2).sum() for e in expected))
    return float(diff / norm)


def sharpness_aware_args(
    optimizer: str, rho: float, eta: Optional[float] = None, update_freq: Optional[int] = None
) -> list:
    """fairseq-train flags of `--optimizer sam|asam` with its ρ (and η, --update-freq)."""
    args = ["--optimizer", optimizer, "--rho", str(rho)]
    if eta is not None:
        args += ["--eta", str(eta)]
    if update_freq is not None:
        args += ["--update-freq", str(update_freq)]
    return args


def leaves(node, prefix=""):
    """(dotted key, value) of every leaf; a legacy argparse Namespace (fairseq's model): a dict."""
    if isinstance(node, argparse.Namespace):
        node = {("_name" if k == "arch" else k): v for k, v in vars(node).items()}
    for key, value in node.items():
        if isinstance(value, (dict, argparse.Namespace)):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# fairseq-hydra-train overrides of the hydra tests' runs: a 1-layer, 16-dimensional model on a CPU.
HYDRA_TINY_CPU_RUN = [
    "dataset.max_tokens=200",
    "common.log_interval=1",
    "common.cpu=true",
    "dataset.num_workers=0",
] + [
    f"+model.{k}={v}"
    for k, v in (
        ("encoder_layers", 1),
        ("decoder_layers", 1),
        ("encoder_embed_dim", 16),
        ("decoder_embed_dim", 16),
        ("encoder_ffn_embed_dim", 32),
        ("decoder_ffn_embed_dim", 32),
    )
]


def hydra_train(config_name: str, data_bin, overrides, cwd, timeout: float, multirun=False):
    """fairseq-hydra-train on `configs/hydra/<config_name>.yaml` with the plugin and the data,
    a tiny model on a CPU (HYDRA_TINY_CPU_RUN) and `overrides`, in `cwd`; its CompletedProcess."""
    command = [sys.executable, "-m", "fairseq_cli.hydra_train"] + ["--multirun"] * multirun
    command += ["--config-dir", HYDRA_DIR, "--config-name", config_name, f"task.data={data_bin}"]
    command += [f"common.user_dir={fairseq_asam.USER_DIR}", *overrides, *HYDRA_TINY_CPU_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    options = dict(capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    return subprocess.run(command, **options)


def compose_hydra(config_name: str, overrides=(), hydra_config: bool = False):
    """`configs/hydra/<config_name>.yaml` composed as fairseq-hydra-train composes it (fairseq's
    schema registered under the config's name, version_base 1.1 as fairseq's own hydra calls
    expect), data and user dir filled in: its leaves as a dict, and with `hydra_config` also
    hydra's multirun subdir (None unless the config sets one)."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    hydra_init(config_name)
    run = ["task.data=/data-bin", f"common.user_dir={fairseq_asam.USER_DIR}"]
    with initialize_config_dir(config_dir=HYDRA_DIR, version_base="1.1"):
        cfg = compose(config_name, run + list(overrides), return_hydra_config=hydra_config)
    GlobalHydra.instance().clear()
    subdir = cfg.hydra.sweep.subdir if hydra_config else None
    container = OmegaConf.to_container(cfg)
    container.pop("hydra", None)
    settings = dict(leaves(OmegaConf.to_container(OmegaConf.create(container), resolve=True)))
    return (settings, subdir) if hydra_config else settings


class FailingCriterion(torch.nn.Module):
    """Wraps a criterion; scales call `scale_call` by `factor` or raises on call `raise_call`."""

    def __init__(self, criterion, scale_call=None, factor=1.0, raise_call=None):
        super().__init__()
        self.criterion, self.calls = criterion, 0
        self.scale_call, self.factor, self.raise_call = scale_call, factor, raise_call

    def forward(self, model, sample, reduce=True):
        self.calls += 1
        if self.calls == self.raise_call:
            raise RuntimeError("injected failure in pass 2")
        loss, size, log = self.criterion(model, sample, reduce=reduce)
        return (loss * self.factor if self.calls == self.scale_call else loss), size, log


# DDP wrappers for ddp_wrapper: torch DDP, optionally with fairseq's --gradient-as-bucket-view
# (.grad tensors are views into DDP's buckets), or fairseq's legacy DDP.
BUCKET_VIEW_SUFFIX = "+gradient_as_bucket_view"


def ddp_wrapper(backend):
    """`wrap_model` for build_trainer: the model in a CPU DDP wrapper (`backend` "pytorch_ddp",
    "pytorch_ddp" + BUCKET_VIEW_SUFFIX or "legacy_ddp") inside fairseq's ModuleProxyWrapper, as
    fairseq wraps it (fairseq's own DDP wrapper needs CUDA)."""
    from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper

    def wrap(model):
        if backend.startswith("pytorch_ddp"):
            inner = torch.nn.parallel.DistributedDataParallel(
                model, gradient_as_bucket_view=backend.endswith(BUCKET_VIEW_SUFFIX)
            )
        else:
            inner = LegacyDistributedDataParallel(
                model, process_group=dist.group.WORLD, buffer_size=2**20
            )
        return ModuleProxyWrapper(inner)

    return wrap


# A worker waits this long for the others (a hang, e.g. mismatched collectives, fails the
# test in minutes rather than torch's default 30).
GLOO_TIMEOUT = datetime.timedelta(seconds=120)


# --- spawned process groups ---------------------------------------------------------------------


def spawn_workers(
    work,
    args=(),
    world_size: int = 2,
    backend: str = "gloo",
    timeout: Optional[datetime.timedelta] = GLOO_TIMEOUT,
) -> list:
    """Runs `work(rank, world_size, *args)` in `world_size` spawned processes joined in one
    process group ("gloo" on one thread each: the workers share the machine's cores; "nccl":
    one GPU each); returns each rank's JSON-able result, in rank order.  `work` must be a
    module-level function (the workers import it by name)."""
    out_dir = tempfile.mkdtemp(prefix="spawned-")
    mp.spawn(
        _spawned_worker,
        args=(work, tuple(args), world_size, backend, timeout, out_dir),
        nprocs=world_size,
        join=True,
    )
    return [read_json(os.path.join(out_dir, f"rank{r}.json")) for r in range(world_size)]


def _spawned_worker(rank, work, args, world_size, backend, timeout, out_dir):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(
        backend,
        init_method=f"file://{os.path.join(out_dir, 'init')}",
        rank=rank,
        world_size=world_size,
        **kwargs,
    )
    if backend == "gloo":
        torch.set_num_threads(1)
    try:
        result = work(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    _write_json(os.path.join(out_dir, f"rank{rank}.json"), result)


# --------------------------------------------------------------------------------------------
# Output folders of fairseq-asam-table4 written by hand (design.md's formats), for the report
# --------------------------------------------------------------------------------------------


def valid_log_line(epoch: int, updates: int, loss: float, bleu: Optional[float] = None) -> str:
    """A `valid` line of fairseq-train --log-format json, as a real run logs it (values as
    strings; `valid_bleu` with --eval-bleu)."""
    record = {"epoch": epoch, "valid_loss": f"{loss:.3f}", "valid_nll_loss": f"{loss - 0.1:.3f}"}
    record.update(valid_ppl="154.2", valid_wps="0", valid_wpb="68", valid_bsz="8")
    if bleu is not None:
        record["valid_bleu"] = f"{bleu}"
    record["valid_num_updates"] = str(updates)
    return f"2026-12-03 18:55:35 | INFO | valid | {json.dumps(record)}\n"


def train_inner_log_line(epoch: int, updates: int, loss: float, sharpness=None) -> str:
    """A `train_inner` line of fairseq-train --log-format json (`sharpness`: SAM/ASAM's)."""
    record = {"epoch": epoch, "update": epoch - 0.5, "loss": f"{loss}", "nll_loss": f"{loss}"}
    if sharpness is not None:
        record["sharpness"] = f"{sharpness}"
    record.update(ppl="141.29", wps="4238", ups="5.82", wpb="714.6", bsz="86.4")
    record.update(num_updates=str(updates), lr="0.001", gnorm="1.783", train_wall="1", wall="5")
    return f"2026-12-03 18:55:36 | INFO | train_inner | {json.dumps(record)}\n"


def write_grid_record(out, **fields) -> dict:
    """<out>/grid.json with design.md's fields (tiny preset, best-bleu, 200 updates unless
    given); returns it."""
    grid = {"preset": "tiny", "protocol": "best-bleu", "rows": ["adam"], "seeds": [1]}
    grid.update(sweeps=[], max_update=200, sharpness_rho=None, runs=[])
    grid.update(fields)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "grid.json"), "w", encoding="utf-8") as f:
        json.dump(grid, f)
    return grid


def write_run_folder(
    out, run: str, scores=None, log: str = "", failure=None, **fields
) -> Optional[dict]:
    """<out>/runs/<run>/ as launch.run_one leaves it: train.log (`log`), results.json once
    evaluated (`scores`: valid BLEU, test BLEU, valid sacreBLEU, test sacreBLEU; `fields`
    override results.json's, e.g. checkpoint, sweep, seed), failure.json (`failure`: (stage,
    error)).  Returns results.json's content."""
    folder = os.path.join(out, "runs", run)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.log"), "w", encoding="utf-8") as f:
        f.write(log)
    if failure is not None:
        with open(os.path.join(folder, "failure.json"), "w", encoding="utf-8") as f:
            json.dump({"stage": failure[0], "error": failure[1], "time": "2026-12-03T18:55"}, f)
    if scores is None:
        return None
    signature = "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0"
    valid, test, valid_sacre, test_sacre = scores
    results = {"run": run, "row": "adam", "optimizer": "adam", "seed": 1, "sweep": {}}
    results.update(preset="tiny", max_update=200, protocol="best-bleu")
    results["train_command"] = "OMP_NUM_THREADS=1 python -m fairseq_cli.train ..."
    results["checkpoint"] = {"choice": "best-bleu", "path": f"{folder}/checkpoints/b.pt"}
    results["checkpoint"].update(sources=["b.pt"], selected_by="bleu", epoch=1, num_updates=4)
    results["valid"] = {"bleu": valid, "sacrebleu": valid_sacre, "sacrebleu_signature": signature}
    results["test"] = {"bleu": test, "sacrebleu": test_sacre, "sacrebleu_signature": signature}
    results.update(fields)
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)
    return results


def markdown_rows(text: str, first_header: str) -> list:
    """The Markdown table of `text` whose header starts with `first_header`: a {header: cell}
    per row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip().strip("|").split("|")])))
    return rows


# The sample archive of `prepared_sample` (conftest): small enough to prepare in about a second.
SAMPLE_N_TRAIN, SAMPLE_N_DEV, SAMPLE_BPE_MERGES = 300, 12, 200


def prepare_sample(
    root: str, n_train=SAMPLE_N_TRAIN, n_dev=SAMPLE_N_DEV, bpe_merges=SAMPLE_BPE_MERGES, **kwargs
) -> str:
    """The sample archive `<root>/de-en.tgz` prepared into `<root>/data/<name>/`; that folder."""
    from fairseq_asam_experiments import prepare

    path = os.path.join(root, "de-en.tgz")
    archive = synthetic_data.build_sample_archive(path, n_train=n_train, n_dev=n_dev)
    return prepare.prepare_iwslt14(archive, os.path.join(root, "data"), bpe_merges, **kwargs)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def wait_for_file(path, timeout: float = 60.0) -> str:
    """The text of `path` once it exists and is not empty (a child process writes it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isfile(path) and os.path.getsize(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def make_data_bin_with_test(root: str, train: int = 120, valid: int = 24, test: int = 24) -> str:
    """The toy corpus with a test split too, binarized."""
    sizes = {"train": train, "valid": valid, "test": test}
    text = synthetic_data.write_corpus(os.path.join(root, "text"), sizes)
    return synthetic_data.binarize(text, os.path.join(root, "data-bin"))


def train_checkpoint(data_bin: str, folder, updates: int = 3, extra=()) -> str:
    """checkpoint_last.pt of the tiny Transformer after `updates` Adam updates, saved by
    fairseq's Trainer into `folder`."""
    argv = ["--optimizer", "adam", "--save-dir", str(folder), *extra]
    trainer = build_trainer(data_bin, argv)
    for sample in batches(trainer, updates):
        trainer.train_step([sample])
    trainer.consolidate_optimizer()
    path = os.path.join(str(folder), "checkpoint_last.pt")
    trainer.save_checkpoint(path, {})
    return path


def _write_json(path, value) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(path + ".tmp", path)


# --- this checkout as a wheel, installed outside it; the session's tiny-preset grid ------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Build artefacts and local state that a copy of the checkout for building leaves out.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", "data-bin",
    ".pytest_cache",
)  # fmt: skip


def build_wheel(root) -> str:
    """A wheel of this checkout in `root`, built from a copy of it (a build leaves build/ and
    *.egg-info in its source folder, and an old build/ would end up in the wheel).  setuptools'
    PEP 517 backend, called directly as pip calls it for a project without pyproject.toml: no
    network, a few seconds (pip wheel takes 3 times as long)."""
    source = os.path.join(root, "source")
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    build = (
        "import sys; from setuptools.build_meta import __legacy__ as backend; "
        "backend.build_wheel(sys.argv[1])"
    )
    dist_dir = os.path.join(root, "dist")
    done = subprocess.run(
        [sys.executable, "-c", build, dist_dir], cwd=source, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = glob.glob(os.path.join(dist_dir, "fairseq_asam-*.whl"))
    return built


def install_wheel(wheel: str, root) -> Tuple[str, str]:
    """A venv in `root` with `wheel` installed (not editable): (its folder, its purelib).  torch,
    fairseq and the kit's dependencies come from the environment running the tests: a `.pth`
    line adds its site-packages folder(s) at the end of the venv's sys.path.  Python does not run
    the `.pth` files of a folder added that way, so the editable fairseq_asam of the running
    environment stays invisible, and fairseq_asam can only come from the wheel."""
    venv = os.path.join(root, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = os.path.join(venv, "bin", "python")
    # Installed before the .pth below exists, so that pip sees no other fairseq_asam.
    install = ["install", "--no-deps", "--no-index", "--quiet", wheel]
    subprocess.run([sys.executable, "-m", "pip", "--python", python, *install], check=True,
                   timeout=600)  # fmt: skip
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run(
        [python, "-c", where], capture_output=True, text=True, check=True
    ).stdout.strip()
    with open(os.path.join(purelib, "running-environment.pth"), "w", encoding="utf-8") as pth:
        pth.writelines(
            folder + "\n" for folder in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
        )
    with open(os.path.join(purelib, "process_record.py"), "w", encoding="utf-8") as f:
        f.write(PROCESS_RECORD_MODULE)
    with open(os.path.join(purelib, "process-record.pth"), "w", encoding="utf-8") as pth:
        pth.write("import process_record\n")
    return venv, purelib


# Every Python process of an installed venv, when PROCESS_RECORD names a file: at its exit, a JSON
# line with its argv (a `python -m` module's file first) and where the two packages came from.
PROCESS_RECORD = "FAIRSEQ_ASAM_TEST_PROCESS_RECORD"
PROCESS_RECORD_MODULE = f"""import atexit, json, os, sys


def record(path=os.environ.get("{PROCESS_RECORD}")):
    if path:
        names = ("fairseq_asam", "fairseq_asam_experiments")
        files = {{name: getattr(sys.modules.get(name), "__file__", None) for name in names}}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({{"argv": sys.argv, "files": files}}) + "\\n")


atexit.register(record)
"""


def read_process_records(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def clean_environment() -> dict:
    """This environment without what would make an installed venv see the checkout."""
    hidden = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in hidden}


# The session's ONE end-to-end grid (conftest's `tiny_grid`): the wheel's fairseq-asam-table4,
# outside the checkout, on the tiny preset and the session's prepared sample (--data-bin: an
# epoch of 5 updates), asam over two learning rates for a few updates, --sharpness-rho, each run
# a submitit-local job, the report.  (`make tiny` prepares the preset's own archive.)
TINY_GRID_UPDATES, TINY_GRID_WARMUP = 6, 50  # WARMUP: the tiny preset's --warmup-updates
TINY_GRID_LEARNING_RATES = ("0.004", "0.005")
TINY_GRID_RUNS = [f"asam-lr{lr}-seed1" for lr in TINY_GRID_LEARNING_RATES]
TINY_GRID_ARGV = [
    "--preset", "tiny", "--optimizers", "asam", "--max-update", str(TINY_GRID_UPDATES),
    "--sweep", "lr=4e-3,0.005", "--sharpness-rho", "0.05",
]  # fmt: skip
TINY_GRID_JOBS = ["--launcher", "submitit-local", "--time-min", "10"]
TINY_GRID_TIMEOUT_SECONDS = 900


class TinyGrid(NamedTuple):  # conftest's `tiny_grid`
    out: pathlib.Path  # its --out folder
    data_bin: str  # its --data-bin
    stdout: str
    report: str  # the report/table4.md it wrote
    processes: list  # each of its Python processes' record (PROCESS_RECORD)


def run_tiny_grid(venv: str, data_bin: str, out, cwd, record) -> subprocess.CompletedProcess:
    """The grid; each of its processes appends its record (PROCESS_RECORD) to `record`."""
    command = [os.path.join(venv, "bin", "fairseq-asam-table4"), *TINY_GRID_ARGV, *TINY_GRID_JOBS]
    env = {**clean_environment(), PROCESS_RECORD: str(record)}
    return subprocess.run(
        command + ["--data-bin", data_bin, "--out", str(out)], capture_output=True, text=True,
        cwd=cwd, env=env, timeout=TINY_GRID_TIMEOUT_SECONDS,
    )  # fmt: skip


# --- every DDP scenario of a session in one spawned group -------------------------------------
# Starting a group costs two interpreters importing torch and fairseq (about 10 s on 2 cores);
# the scenarios themselves take seconds.  A test module registers its scenarios at import
# (`ddp_scenario`), pytest imports every selected module before running any test, and the first
# test that asks for a result (`ddp_results`) runs all registered scenarios in one group.

DDP_WORLD_SIZE = 2
_DDP_SCENARIOS = {}  # name -> (module, function name, keyword arguments)
_DDP_RESULTS = {}  # data_bin -> {name: [each rank's result]}
FAILED = "scenario failed"  # the key of a rank's result when its scenario raised


def ddp_scenario(name: str, function, **kwargs) -> None:
    """Registers `function(rank, data_bin, **kwargs) -> JSON-able` as the DDP scenario `name`,
    run by every rank of the session's group (harness.DDP_WORLD_SIZE gloo processes, already
    joined: fairseq's Trainer sees the world size from --distributed-world-size)."""
    _DDP_SCENARIOS[name] = (function.__module__, function.__name__, kwargs)


def ddp_results(data_bin: str, name: str) -> list:
    """Each rank's result of scenario `name`; the first call runs every registered scenario in
    one spawned group, one result file per scenario and rank."""
    if data_bin not in _DDP_RESULTS:
        scenarios = dict(_DDP_SCENARIOS)
        out_dir = tempfile.mkdtemp(prefix="ddp-scenarios-")
        spawn_workers(_run_scenarios, (scenarios, data_bin, out_dir), DDP_WORLD_SIZE)
        _DDP_RESULTS[data_bin] = {
            n: [read_json(_scenario_file(out_dir, n, r)) for r in range(DDP_WORLD_SIZE)]
            for n in scenarios
        }
    ranks = _DDP_RESULTS[data_bin][name]
    failures = [r[FAILED] for r in ranks if isinstance(r, dict) and FAILED in r]
    assert not failures, f"DDP scenario {name} raised:\n" + "\n".join(failures)
    return ranks


def _scenario_file(out_dir, name, rank):
    return os.path.join(out_dir, f"{name.replace('/', '--')}.rank{rank}.json")


def _run_scenarios(rank, world_size, scenarios, data_bin, out_dir):
    """Every scenario in turn.  One that raises is recorded; the ones after it are not run (the
    other rank may be waiting in a collective that will never match: it times out, then it
    stops too)."""
    failed = None
    for name, (module, function, kwargs) in scenarios.items():
        if failed is None:
            try:
                run = getattr(importlib.import_module(module), function)
                result = run(rank, data_bin, **kwargs)
            except Exception:
                failed = name
                result = {FAILED: f"rank {rank}: {traceback.format_exc()}"}
        else:
            result = {FAILED: f"rank {rank}: not run, scenario {failed} raised before"}
        _write_json(_scenario_file(out_dir, name, rank), result)
    return sorted(scenarios)
