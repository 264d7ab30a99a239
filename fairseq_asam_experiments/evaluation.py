"""`fairseq-asam-evaluate`: fairseq-generate (beam 5, BPE removed) per split; `bleu`: its
tokenized BLEU, *assumed* Table 4's metric; `sacrebleu`: of the detokenized output.  Neither is
--eval-bleu's (what `best-bleu` selects by).  torch and fairseq only inside functions (the grid
imports this module)."""

import argparse
import contextlib
import functools
import json
import logging
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import unittest.mock
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import loading
from .cli import run_command
from .errors import ExperimentError, SettingError
from .files import atomic_output, read_json_object, write_json
from .recipe import plugin_dir

logger = logging.getLogger(__name__)

PROGRAM = "fairseq-asam-evaluate"
SPLITS = ("valid", "test")
BEAM, BATCH_SIZE = 5, 128  # fairseq's IWSLT'14 example
DEFAULT_CHECKPOINT = "best-bleu"  # Table 4's protocol as we read the paper (configs/README.md)
NAMED_CHECKPOINTS = dict.fromkeys(["best-loss", "best-bleu"], "checkpoint_best.pt")
NAMED_CHECKPOINTS["last"] = "checkpoint_last.pt"
SELECTION_METRICS = {"best-loss": "loss", "best-bleu": "bleu"}  # --best-checkpoint-metric
AVERAGE = "average:"
CHOICES = "best-loss, best-bleu, last or average:N"
EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")
FAIRSEQ_GENERATE = ("-m", "fairseq_cli.generate")
# generate_each in a child process: `python -m fairseq_asam_experiments.evaluation JOBS_JSON`.
GENERATE_EACH = (sys.executable, "-m", __name__)
TOKENIZED_BLEU_NOTE = "tokenized, assumed Table 4's metric"
# What an evaluation writes into results.json: another evaluation leaves none of it behind.
EVALUATION_KEYS = ("protocol", "checkpoint", "sharpness") + SPLITS


@dataclass(frozen=True)
class CheckpointChoice:
    kind: str  # "best-loss", "best-bleu", "last" or "average"
    num_epochs: int = 0  # for "average": how many of the last epoch checkpoints

    def __str__(self) -> str:  # the --checkpoint value
        return f"{AVERAGE}{self.num_epochs}" if self.kind == "average" else self.kind

    @property
    def selection_metric(self) -> str:  # the --best-checkpoint-metric the run trains with
        return SELECTION_METRICS.get(self.kind, "loss")


def parse_checkpoint_choice(text: str) -> CheckpointChoice:
    if text in NAMED_CHECKPOINTS:
        return CheckpointChoice(text)
    count = text[len(AVERAGE) :] if text.startswith(AVERAGE) else ""
    if count.isdigit() and int(count) >= 1:
        return CheckpointChoice("average", int(count))
    raise SettingError(f"--checkpoint must be {CHOICES} with N >= 1, got {text!r}")


def checkpoint_position(path: str) -> Dict[str, Optional[int]]:
    """{"epoch", "num_updates"} a fairseq checkpoint was saved at (None where not recorded)."""
    state = loading.read_checkpoint(path)
    updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates")
    iterator = (state.get("extra_state") or {}).get("train_iterator") or {}
    epoch = iterator.get("epoch")
    # fairseq records the epoch a resume starts: after an epoch's end, the next one.
    if epoch is not None and epoch > 1 and iterator.get("iterations_in_epoch") == 0:
        epoch -= 1
    return {"epoch": epoch, "num_updates": updates}


def checkpoint_inputs(save_dir: str, choice: CheckpointChoice) -> List[str]:
    """The checkpoint files `choice` reads (`average:N`: the N newest epoch checkpoints)."""
    if not os.path.isdir(save_dir):
        raise ExperimentError(f"checkpoint folder not found: {save_dir}")
    if choice.kind in NAMED_CHECKPOINTS:
        path = os.path.join(save_dir, NAMED_CHECKPOINTS[choice.kind])
        if not os.path.isfile(path):
            raise ExperimentError(f"--checkpoint {choice}: {path} not found")
        return [path]
    matches = (EPOCH_CHECKPOINT.match(name) for name in os.listdir(save_dir))
    epochs = sorted(((int(m.group(1)), m.group(0)) for m in matches if m), reverse=True)
    if len(epochs) < choice.num_epochs:
        raise ExperimentError(
            f"--checkpoint {choice} needs {choice.num_epochs} epoch checkpoints in {save_dir}, "
            f"found {len(epochs)} (train with --keep-last-epochs >= {choice.num_epochs})"
        )
    return [os.path.join(save_dir, name) for _, name in epochs[: choice.num_epochs]]


def average_checkpoints(paths: Sequence[str]) -> dict:
    """fairseq's scripts/average_checkpoints.py: the mean of the `model` parameters of `paths`,
    everything else from the first; fp16/bf16 averaged in fp32, integers floored."""
    import torch

    states = [loading.read_checkpoint(path) for path in paths]
    for path, state in zip(paths[1:], states[1:]):
        if list(state["model"]) != list(states[0]["model"]):
            raise ExperimentError(f"{path} has other parameters than {paths[0]}: not averaged")
    averaged = {}
    for name, first in states[0]["model"].items():
        half = first.dtype in (torch.float16, torch.bfloat16)
        total = sum(s["model"][name].float() if half else s["model"][name] for s in states)
        averaged[name] = total / len(paths) if total.is_floating_point() else total // len(paths)
    return {**states[0], "model": averaged}


def resolve_checkpoint(save_dir: str, choice: CheckpointChoice) -> Tuple[str, List[str]]:
    """The checkpoint to evaluate (`average:N` writes one), and the files it is made of."""
    import torch

    sources = checkpoint_inputs(save_dir, choice)
    # checkpoint_best.pt by loss is never reported as best-bleu, nor the other way round
    wanted = SELECTION_METRICS.get(choice.kind)
    if wanted is not None:
        saved = loading.saved_settings(loading.read_checkpoint(sources[0]), "checkpoint")
        metric = saved.get("best_checkpoint_metric") or "loss"
        maximize = bool(saved.get("maximize_best_checkpoint_metric"))
        if (metric, maximize) != (wanted, wanted == "bleu"):
            raise ExperimentError(
                f"--checkpoint {choice}: {sources[0]} was selected by the "
                f"{'highest' if maximize else 'lowest'} validation {metric} "
                f"(--best-checkpoint-metric {metric}), not by the "
                f"{'highest' if wanted == 'bleu' else 'lowest'} validation {wanted}"
            )
    if choice.kind in NAMED_CHECKPOINTS:
        return sources[0], sources
    path = os.path.join(save_dir, f"checkpoint_average{choice.num_epochs}.pt")
    logger.info(f"averaging {', '.join(map(os.path.basename, sources))} into {path}")
    with atomic_output(path) as temporary:
        torch.save(average_checkpoints(sources), temporary)
    return path, sources


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Tuple[float, str]:
    """BLEU-4 as fairseq-generate / fairseq-score compute it (fairseq's C scorer on the ids of a
    fresh Dictionary, so an unknown reference word never matches): (score, result string)."""
    from fairseq.data import Dictionary
    from fairseq.scoring import bleu

    if not hypotheses:
        raise ExperimentError("no sentences to score")
    words = Dictionary()
    scorer = bleu.Scorer(bleu.BleuConfig(pad=words.pad(), eos=words.eos(), unk=words.unk()))
    for hypothesis, reference in zip(hypotheses, references):
        scorer.add(*[words.encode_line(t, add_if_not_exist=True) for t in (reference, hypothesis)])
    if scorer.stat.predlen == 0:  # fairseq's brevity() divides by it
        return 0.0, "BLEU4 = 0.00 (no hypothesis tokens)"
    return scorer.score(), scorer.result_string()


def moses_detokenize(lines: Sequence[str]) -> List[str]:
    from sacremoses import MosesDetokenizer

    detokenizer = MosesDetokenizer(lang="en")
    return [detokenizer.detokenize(line.split()) for line in lines]


def detokenized_sacrebleu(hypotheses: Sequence[str], references: Sequence[str]) -> Tuple:
    """Case-insensitive sacreBLEU (13a) of detokenized text: (score, signature with case:lc)."""
    import sacrebleu

    metric = sacrebleu.BLEU(lowercase=True)  # IWSLT'14 is lowercased on both sides
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())


@dataclass
class GenerateOutput:  # fairseq-generate's H- (the best) and T- lines, by sentence id
    hypotheses: List[str]
    references: List[str]
    ids: List[int]


def parse_generate_output(text: str) -> GenerateOutput:
    found = re.findall(r"^H-(\d+)\t[^\t\n]*\t(.*)$", text, re.M)[::-1]
    hypotheses = {int(i): line for i, line in found}
    references = {int(i): line for i, line in re.findall(r"^T-(\d+)\t(.*)$", text, re.M)}
    if set(hypotheses) != set(references):
        counts = f"{len(hypotheses)} hypotheses for {len(references)} references"
        raise ExperimentError(f"fairseq-generate output has {counts}")
    ids = sorted(hypotheses)
    return GenerateOutput([hypotheses[i] for i in ids], [references[i] for i in ids], ids)


def score_split(output: GenerateOutput, references_path: Optional[str] = None) -> Dict:
    """Both BLEU scores; sacreBLEU against `references_path`, else the detokenized T- lines."""
    bleu, details = tokenized_bleu(output.hypotheses, output.references)
    if references_path is None:
        references = moses_detokenize(output.references)
    else:
        lines = pathlib.Path(references_path).read_text(encoding="utf-8").splitlines()
        if output.ids and max(output.ids) >= len(lines):
            raise ExperimentError(
                f"references file {references_path} has {len(lines)} lines, "
                f"sentence id {max(output.ids)} needs more"
            )
        references = [lines[i] for i in output.ids]
    sacre, signature = detokenized_sacrebleu(moses_detokenize(output.hypotheses), references)
    scores = dict(bleu=round(bleu, 4), bleu_metric=TOKENIZED_BLEU_NOTE, bleu_details=details)
    scores.update(sacrebleu=round(sacre, 4), sacrebleu_signature=signature)
    scores["sacrebleu_references"] = references_path or "detokenized T- lines of fairseq-generate"
    return {**scores, "sentences": len(output.ids)}


def generate_command(data_bin, checkpoint, split, user_dir) -> List[str]:
    # fairseq-fixed 0.12.3.1 leaves out the last batch's sentences when it is not a multiple of
    # --required-batch-size-multiple (default 8): with 1 every sentence is scored.
    return [sys.executable, *FAIRSEQ_GENERATE, data_bin, "--user-dir", user_dir] + [
        *("--path", checkpoint, "--gen-subset", split, "--beam", str(BEAM)),
        *("--batch-size", str(BATCH_SIZE), "--required-batch-size-multiple", "1", "--remove-bpe"),
    ]


def generate_each(jobs: Sequence[Tuple[Sequence[str], str]]) -> None:
    """Each (fairseq-generate command, output file) of `jobs` through fairseq-generate's own
    cli_main in THIS process: fairseq is imported once for every split (about 5 s each)."""
    from fairseq_cli import generate

    root = logging.getLogger()  # each split starts from the logging a fresh process has
    handlers, level = list(root.handlers), root.level
    for command, output_path in jobs:
        if tuple(command[1:3]) != FAIRSEQ_GENERATE:  # what generate_command starts with
            raise ExperimentError(f"not a fairseq-generate command: {shlex.join(command)}")
        print(f"generating: {shlex.join(command)}", file=sys.stderr, flush=True)
        root.handlers[:], root.level = handlers, level
        argv = ["fairseq-generate", *command[3:]]
        with open(output_path, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
            with unittest.mock.patch.object(sys, "argv", argv):
                generate.cli_main()


def run_generate(jobs, log_path: str, env=None, call=None) -> List[str]:
    """The output of each (command, output path) of `jobs`, run by generate_each in one child
    process (its log and a failure's traceback in `log_path`); `call`: the launcher's, which
    can stop it.  No output path is written unless every split succeeds."""
    logger.info(f"generating {', '.join(p for _, p in jobs)}; log {log_path}")
    call = call or functools.partial(subprocess.call, stderr=subprocess.STDOUT)
    with contextlib.ExitStack() as outputs, open(log_path, "w", encoding="utf-8") as log:
        temporaries = [outputs.enter_context(atomic_output(path)) for _, path in jobs]
        to_temporaries = json.dumps([[list(c), t] for (c, _), t in zip(jobs, temporaries)])
        status = call([*GENERATE_EACH, to_temporaries], stdout=log, env=env)
        if status != 0:
            how = f"exit status {status}"
            if status < 0:
                how = f"killed by {signal.Signals(-status).name}"
            raise ExperimentError(f"fairseq-generate failed ({how}); see {log_path}")
    return [pathlib.Path(path).read_text(encoding="utf-8") for _, path in jobs]


def evaluation_inputs(data_bin, save_dir, choice, references=None) -> Dict:
    """What an evaluation's numbers depend on, for a stage stamp: [path, size, mtime_ns] of each
    checkpoint file (or why it cannot be read yet), data, references, protocol, beam."""
    try:
        stats = {path: os.stat(path) for path in checkpoint_inputs(save_dir, choice)}
        files = [[path, s.st_size, s.st_mtime_ns] for path, s in stats.items()]
    except ExperimentError as error:
        files = str(error)
    references = {s: os.path.abspath(p) for s, p in sorted((references or {}).items())}
    inputs = dict(protocol=str(choice), beam=BEAM, batch_size=BATCH_SIZE, references=references)
    return {**inputs, "data_bin": os.path.abspath(data_bin), "checkpoint_files": files}


def evaluate_checkpoint(
    data_bin, save_dir, user_dir, choice, references=None, output_dir=None, **run
):
    """{"protocol", "checkpoint", <split>: scores} (results.json's); `references`: split -> raw
    references for sacreBLEU; `output_dir` (default: above `save_dir`): generate-<split>.txt;
    `run`: run_generate's env and call."""
    references = references or {}
    for split in SPLITS:
        loading.check_split(data_bin, split, "split")
        if split in references and not os.path.isfile(references[split]):
            raise ExperimentError(f"references file for {split} not found: {references[split]}")
    checkpoint, sources = resolve_checkpoint(save_dir, choice)
    output_dir = output_dir or os.path.dirname(os.path.abspath(save_dir))
    selected = dict(path=checkpoint, sources=sources, **checkpoint_position(sources[0]))
    selected["selected_by"] = SELECTION_METRICS.get(choice.kind)  # an average: its newest's epoch
    results = {"protocol": str(choice), "checkpoint": selected}
    commands = [generate_command(data_bin, checkpoint, split, user_dir) for split in SPLITS]
    paths = [os.path.join(output_dir, f"generate-{split}.txt") for split in SPLITS]
    log = os.path.join(output_dir, "generate.log")
    texts = run_generate(list(zip(commands, paths)), log, **run)
    for split, command, path, text in zip(SPLITS, commands, paths, texts):
        scores = score_split(parse_generate_output(text), references.get(split))
        results[split] = {**scores, "command": shlex.join(command), "output": path}
        sacre = f"sacreBLEU {scores['sacrebleu']:.2f} ({scores['sacrebleu_signature']})"
        logger.info(f"{split}: BLEU {scores['bleu']:.2f} ({TOKENIZED_BLEU_NOTE}), {sacre}")
    return results


def parser() -> argparse.ArgumentParser:
    about = "BLEU on valid and test into RUN_DIR/results.json (its other entries kept)."
    p = argparse.ArgumentParser(prog=PROGRAM, description=about)
    p.add_argument("run_dir", help="a run folder holding checkpoints/")
    p.add_argument("--data-bin", required=True, help="the binarized data the run trained on")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"{CHOICES} (%(default)s)")
    p.add_argument("--references-dir", help="folder of the raw references <split>.raw.en")
    return p


def work(args: argparse.Namespace) -> int:
    folder, choice = args.references_dir, parse_checkpoint_choice(args.checkpoint)
    raw = {s: os.path.join(folder, f"{s}.raw.en") for s in SPLITS if folder}
    save_dir = os.path.join(args.run_dir, "checkpoints")
    scores = evaluate_checkpoint(args.data_bin, save_dir, plugin_dir(), choice, references=raw)
    path = os.path.join(args.run_dir, "results.json")
    results = {k: v for k, v in (read_json_object(path) or {}).items() if k not in EVALUATION_KEYS}
    write_json(path, {**results, **scores})
    print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    return run_command(PROGRAM, lambda: work(args))


if __name__ == "__main__":  # run_generate's child (not a command: fairseq-asam-evaluate is)
    generate_each(json.loads(sys.argv[1]))
