"""BLEU of a trained fairseq translation model, and the `fairseq-asam-evaluate` command.

One `fairseq-generate` run per split (beam 5, BPE removed) writes `generate-<split>.txt`; from
its H- and T- lines: `bleu`, tokenized BLEU exactly as fairseq-generate prints it (checked), an
unknown reference word never matching, *assumed* to be Table 4's metric (the paper does not name
its BLEU); `sacrebleu`, case-insensitive sacreBLEU of the Moses-detokenized hypotheses against
the raw references (or the detokenized T- lines).  Neither is fairseq-train's --eval-bleu value
(what `best-bleu` selects by).  `--checkpoint` (configs/README.md): `best-loss`/`best-bleu` read
checkpoint_best.pt, checked to be selected by that metric; `last`; `average:N`, the last N epoch
checkpoints averaged as fairseq's average_checkpoints.py does.  torch and fairseq are imported
inside functions: the grid imports this module.
"""

import argparse
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import loading
from .errors import ExperimentError, SettingError
from .files import atomic_output, read_json_object, write_json

logger = logging.getLogger(__name__)

PROGRAM = "fairseq-asam-evaluate"
EVALUATED_SPLITS = ("valid", "test")
DEFAULT_BEAM = 5
DEFAULT_BATCH_SIZE = 128  # fairseq's IWSLT'14 example
DEFAULT_CHECKPOINT = "best-bleu"  # Table 4's protocol as we read the paper (configs/README.md)
TARGET_LANG = "en"
BEST_CHECKPOINT, LAST_CHECKPOINT = "checkpoint_best.pt", "checkpoint_last.pt"
NAMED_CHECKPOINTS = dict(
    zip(("best-loss", "best-bleu", "last"), (BEST_CHECKPOINT,) * 2 + (LAST_CHECKPOINT,))
)
# The `best-*` protocols -> fairseq's --best-checkpoint-metric the run must have selected by.
SELECTION_METRICS = {"best-loss": "loss", "best-bleu": "bleu"}
AVERAGE_PREFIX = "average:"
CHOICES = "best-loss, best-bleu, last or average:N"
EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")
GENERATE_FILE = "generate-{split}.txt"
RESULTS_NAME = "results.json"
# fairseq-generate's last line: "Generate test with beam=5: BLEU4 = 34.86, 68.1/42.8/... (BP=...)"
GENERATE_SCORE_LINE = re.compile(r"^Generate (\S+) with beam=(\d+): (BLEU4 = ([0-9.]+),.*)$")
PRINTED_BLEU_TOLERANCE = 0.006  # fairseq-generate prints BLEU rounded to 2 decimals
TOKENIZED_BLEU_NOTE = "tokenized, assumed Table 4's metric"


@dataclass(frozen=True)
class CheckpointChoice:
    kind: str  # "best-loss", "best-bleu", "last" or "average"
    num_epochs: int = 0  # for "average": how many of the last epoch checkpoints

    def __str__(self) -> str:
        """The --checkpoint value: the protocol's name in every report."""
        return f"{AVERAGE_PREFIX}{self.num_epochs}" if self.kind == "average" else self.kind

    @property
    def selection_metric(self) -> str:
        """The --best-checkpoint-metric the run trains with: bleu for `best-bleu`, else loss."""
        return SELECTION_METRICS.get(self.kind, "loss")


def parse_checkpoint_choice(text: str) -> CheckpointChoice:
    """`best-loss`, `best-bleu`, `last` or `average:N` (N >= 1), as given to --checkpoint."""
    if text in NAMED_CHECKPOINTS:
        return CheckpointChoice(text)
    count = text[len(AVERAGE_PREFIX) :] if text.startswith(AVERAGE_PREFIX) else ""
    if count.isdigit() and int(count) >= 1:
        return CheckpointChoice("average", int(count))
    if text == "best":
        raise SettingError(
            "--checkpoint best names no protocol: use best-loss (checkpoint_best.pt selected by "
            "validation loss) or best-bleu (selected by validation BLEU)"
        )
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
    as_int = lambda value: None if value is None else int(value)  # noqa: E731
    return {"epoch": as_int(epoch), "num_updates": as_int(updates)}


def checkpoint_selection_metric(path: str) -> Tuple[str, bool]:
    """(--best-checkpoint-metric, --maximize-best-checkpoint-metric) of a checkpoint's config."""
    saved = loading.saved_settings(loading.read_checkpoint(path), "checkpoint")
    metric, maximize = (
        saved.get("best_checkpoint_metric"),
        saved.get("maximize_best_checkpoint_metric"),
    )
    return str(metric or "loss"), bool(maximize)


def check_selection(path: str, choice: CheckpointChoice) -> None:
    """For `best-*`: raises unless checkpoint_best.pt was selected by that protocol's metric, in
    its direction (a checkpoint selected by loss is never reported as best-bleu)."""
    wanted = SELECTION_METRICS.get(choice.kind)
    if wanted is None:
        return
    metric, maximize = checkpoint_selection_metric(path)
    if metric != wanted or maximize != (wanted == "bleu"):
        direction = "highest" if maximize else "lowest"
        wanted_text = "highest validation BLEU" if wanted == "bleu" else "lowest validation loss"
        raise ExperimentError(
            f"--checkpoint {choice}: {path} was selected by the {direction} validation {metric} "
            f"(--best-checkpoint-metric {metric}), not by the {wanted_text}"
        )


def checkpoint_inputs(save_dir: str, choice: CheckpointChoice) -> List[str]:
    """The checkpoint files `choice` reads: checkpoint_best.pt or _last.pt, or for `average:N`
    the N newest `checkpoint<epoch>.pt`, newest first (by epoch number)."""
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
    everything else from the first.  fp16/bf16 are averaged in fp32; integer tensors get the
    floor of the mean."""
    import torch

    states = [loading.read_checkpoint(path) for path in paths]
    for path, state in zip(paths[1:], states[1:]):
        if list(state["model"]) != list(states[0]["model"]):
            raise ExperimentError(f"{path} has other parameters than {paths[0]}: not averaged")
    averaged = {}
    for name, first in states[0]["model"].items():
        half = first.dtype in (torch.float16, torch.bfloat16)
        total = torch.stack(
            [s["model"][name].float() if half else s["model"][name] for s in states]
        ).sum(0)
        averaged[name] = total / len(paths) if total.is_floating_point() else total // len(paths)
    return {**states[0], "model": averaged}


def resolve_checkpoint(save_dir: str, choice: CheckpointChoice) -> Tuple[str, List[str]]:
    """The checkpoint file to evaluate for `choice`, and the files it was made of.  `best-*`
    check what checkpoint_best.pt was selected by; `average:N` writes checkpoint_average<N>.pt."""
    import torch

    sources = checkpoint_inputs(save_dir, choice)
    if choice.kind in NAMED_CHECKPOINTS:
        check_selection(sources[0], choice)
        return sources[0], sources
    path = os.path.join(save_dir, f"checkpoint_average{choice.num_epochs}.pt")
    logger.info(f"averaging {', '.join(map(os.path.basename, sources))} into {path}")
    with atomic_output(path) as temporary:
        torch.save(average_checkpoints(sources), temporary)
    return path, sources


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Tuple[float, str]:
    """BLEU-4 as fairseq-generate / fairseq-score compute it: (score, result string).  Tokens are
    mapped to ids by a fairseq Dictionary, fairseq's C scorer counts the n-grams."""
    from fairseq.data import Dictionary
    from fairseq.scoring import bleu

    if len(hypotheses) != len(references):
        raise ExperimentError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ExperimentError("no sentences to score")
    vocabulary = Dictionary()
    config = bleu.BleuConfig(pad=vocabulary.pad(), eos=vocabulary.eos(), unk=vocabulary.unk())
    scorer = bleu.Scorer(config)
    for hypothesis, reference in zip(hypotheses, references):
        scorer.add(
            vocabulary.encode_line(reference, add_if_not_exist=True),
            vocabulary.encode_line(hypothesis, add_if_not_exist=True),
        )
    if scorer.stat.predlen == 0:  # fairseq's brevity() divides by it
        return 0.0, "BLEU4 = 0.00 (no hypothesis tokens)"
    return scorer.score(), scorer.result_string()


def moses_detokenize(lines: Sequence[str], lang: str = TARGET_LANG) -> List[str]:
    from sacremoses import MosesDetokenizer

    detokenizer = MosesDetokenizer(lang=lang)
    return [detokenizer.detokenize(line.split()) for line in lines]


def detokenized_sacrebleu(
    hypotheses: Sequence[str], references: Sequence[str]
) -> Tuple[float, str]:
    """Case-insensitive sacreBLEU (13a) of detokenized text: (score, signature with case:lc)."""
    import sacrebleu

    metric = sacrebleu.BLEU(lowercase=True)  # IWSLT'14 is lowercased on both sides
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())


@dataclass
class GenerateOutput:
    hypotheses: List[str]  # first H- line of each sentence (BPE removed), in sentence-id order
    references: List[str]  # T- lines, same order
    ids: List[int]
    printed_score_line: Optional[str]  # "BLEU4 = ..." of fairseq-generate's last line
    printed_bleu: Optional[float]


def parse_generate_output(text: str) -> GenerateOutput:
    """Reads the `H-<id>\\t<score>\\t<text>` and `T-<id>\\t<text>` lines of fairseq-generate."""
    hypotheses: Dict[int, str] = {}
    references: Dict[int, str] = {}
    printed_line, printed_bleu = None, None
    for line in text.splitlines():
        fields = line.split("\t")
        if line.startswith("H-"):  # the first (best) of --nbest hypotheses
            hypotheses.setdefault(int(fields[0][2:]), fields[2] if len(fields) > 2 else "")
        elif line.startswith("T-"):
            references[int(fields[0][2:])] = fields[1] if len(fields) > 1 else ""
        elif GENERATE_SCORE_LINE.match(line):
            match = GENERATE_SCORE_LINE.match(line)
            printed_line, printed_bleu = match.group(3), float(match.group(4))
    if set(hypotheses) != set(references):
        raise ExperimentError(
            f"fairseq-generate output has {len(hypotheses)} hypotheses "
            f"for {len(references)} references"
        )
    ids = sorted(hypotheses)
    return GenerateOutput(
        [hypotheses[i] for i in ids], [references[i] for i in ids], ids, printed_line, printed_bleu
    )


def score_split(output: GenerateOutput, references_path: Optional[str] = None) -> Dict:
    """Both BLEU scores of one parsed fairseq-generate output; raises if the tokenized BLEU
    differs from the one fairseq-generate printed."""
    bleu, details = tokenized_bleu(output.hypotheses, output.references)
    if output.printed_bleu is not None and abs(output.printed_bleu - bleu) > PRINTED_BLEU_TOLERANCE:
        printed = output.printed_score_line
        raise ExperimentError(
            f"recomputed BLEU {bleu:.4f} differs from fairseq-generate's {printed!r}"
        )
    if references_path is None:
        references = moses_detokenize(output.references)
    else:
        with open(references_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if output.ids and max(output.ids) >= len(lines):
            raise ExperimentError(
                f"references file {references_path} has {len(lines)} lines, "
                f"sentence id {max(output.ids)} needs more"
            )
        references = [lines[i] for i in output.ids]
    sacre, signature = detokenized_sacrebleu(moses_detokenize(output.hypotheses), references)
    return {
        "bleu": round(bleu, 4), "bleu_metric": TOKENIZED_BLEU_NOTE, "bleu_details": details,
        "fairseq_generate_bleu": output.printed_score_line,
        "sacrebleu": round(sacre, 4), "sacrebleu_signature": signature,
        "sacrebleu_references": references_path or "detokenized T- lines of fairseq-generate",
        "sentences": len(output.ids),
    }  # fmt: skip


def generate_command(
    data_bin, checkpoint, split, user_dir, beam=DEFAULT_BEAM, batch_size=DEFAULT_BATCH_SIZE
) -> List[str]:
    # fairseq-fixed 0.12.3.1 leaves out the last batch's sentences when it is not a multiple of
    # --required-batch-size-multiple (default 8): with 1 every sentence is scored.
    return (
        [sys.executable, "-m", "fairseq_cli.generate", data_bin, "--user-dir", user_dir]
        + ["--path", checkpoint, "--gen-subset", split, "--beam", str(beam)]
        + ["--batch-size", str(batch_size), "--required-batch-size-multiple", "1", "--remove-bpe"]
    )


def run_generate(command: Sequence[str], output_path: str, env: Optional[Dict] = None) -> str:
    """Runs fairseq-generate into `output_path` (written atomically: complete or absent); a failed
    run's output is kept as `<output_path>.failed`, named in the error."""
    logger.info(f"generating {output_path}: {shlex.join(command)}")
    with atomic_output(output_path) as temporary:
        with open(temporary, "w", encoding="utf-8") as out:
            status = subprocess.call(list(command), stdout=out, stderr=subprocess.STDOUT, env=env)
        if status != 0:
            os.replace(temporary, output_path + ".failed")
            raise ExperimentError(
                f"fairseq-generate failed with exit status {status}; see {output_path}.failed"
            )
    with open(output_path, encoding="utf-8") as f:
        return f.read()


def evaluation_inputs(data_bin, save_dir, choice, references=None, beam=DEFAULT_BEAM) -> Dict:
    """What an evaluation's numbers depend on, JSON-able as read back (lists, not tuples), for a
    stage stamp: protocol, beam, batch size, references, data-bin (folders named by their
    content), and [path, size, mtime_ns] of each checkpoint file `choice` reads (a checkpoint
    trained further is another input).  A choice that cannot be read yet gives its error text."""
    try:
        files = [
            [path, os.stat(path).st_size, os.stat(path).st_mtime_ns]
            for path in checkpoint_inputs(save_dir, choice)
        ]
    except ExperimentError as error:
        files = str(error)
    return {
        "protocol": str(choice), "beam": beam, "batch_size": DEFAULT_BATCH_SIZE,
        "references": {s: os.path.abspath(p) for s, p in sorted((references or {}).items())},
        "data_bin": os.path.abspath(data_bin), "checkpoint_files": files,
    }  # fmt: skip


def evaluate_checkpoint(
    data_bin, save_dir, user_dir, choice=CheckpointChoice(DEFAULT_CHECKPOINT),
    splits=EVALUATED_SPLITS, beam=DEFAULT_BEAM, batch_size=DEFAULT_BATCH_SIZE, references=None,
    output_dir=None, env=None,
) -> Dict:  # fmt: skip
    """Generates and scores every split: {"protocol", "checkpoint", <split>: scores} (results.json's
    keys).  `references`: split -> raw reference file for sacreBLEU; generate outputs go to
    `output_dir` (default: the folder above `save_dir`)."""
    for split in splits:
        loading.check_split(data_bin, split, "--splits")
    for split, path in (references or {}).items():
        if not os.path.isfile(path):
            raise ExperimentError(f"references file for {split} not found: {path}")
    checkpoint, sources = resolve_checkpoint(save_dir, choice)
    output_dir = output_dir or os.path.dirname(os.path.abspath(save_dir))
    results = {
        "protocol": str(choice),
        "checkpoint": {
            "choice": str(choice), "path": checkpoint, "sources": sources,
            "selected_by": SELECTION_METRICS.get(choice.kind),
            **checkpoint_position(sources[0]),  # an average: where its newest source was saved
        },
    }  # fmt: skip
    for split in splits:
        command = generate_command(data_bin, checkpoint, split, user_dir, beam, batch_size)
        output_path = os.path.join(output_dir, GENERATE_FILE.format(split=split))
        output = parse_generate_output(run_generate(command, output_path, env))
        scores = score_split(output, (references or {}).get(split))
        results[split] = {**scores, "command": shlex.join(command), "output": output_path}
        logger.info(
            f"{split}: BLEU {scores['bleu']:.2f} ({TOKENIZED_BLEU_NOTE}), "
            f"sacreBLEU {scores['sacrebleu']:.2f} ({scores['sacrebleu_signature']})"
        )
    return results


# ----------------------------------------------------------------------- fairseq-asam-evaluate

# What an evaluation writes into results.json: another evaluation leaves none of it behind.
EVALUATION_KEYS = ("protocol", "checkpoint", "evaluation", "sharpness") + EVALUATED_SPLITS


ARGUMENTS = {  # name -> argparse keywords
    "run_dir": dict(help="a run folder holding checkpoints/"),
    "--data-bin": dict(required=True, help="the binarized data the run trained on"),
    "--checkpoint": dict(default=DEFAULT_CHECKPOINT, help=f"{CHOICES} (default: %(default)s)"),
    "--splits": dict(default=",".join(EVALUATED_SPLITS), help="comma-separated splits"),
    "--references-dir": dict(help=f"folder of raw references <split>.raw.{TARGET_LANG}"),
    "--beam": dict(type=int, default=DEFAULT_BEAM),
    "--batch-size": dict(type=int, default=DEFAULT_BATCH_SIZE),
}


def parser() -> argparse.ArgumentParser:
    description = "BLEU of a trained run into RUN_DIR/results.json (its other entries kept)."
    p = argparse.ArgumentParser(prog=PROGRAM, description=description)
    for name, keywords in ARGUMENTS.items():
        p.add_argument(name, **keywords)
    return p


def write_evaluation(path: str, evaluated: Dict, inputs: Dict) -> Dict:
    """Writes `evaluated` into the results.json at `path`, keeping its other entries; the splits
    of an earlier evaluation stay only if it had the same `inputs` (--splits valid, then test)."""
    results = read_json_object(path) or {}
    if results.get("evaluation") != inputs:
        results = {k: v for k, v in results.items() if k not in EVALUATION_KEYS}
    results.update(evaluated, evaluation=inputs)
    write_json(path, results)
    return results


def work(args: argparse.Namespace) -> int:
    from .layout import plugin_dir

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    choice = parse_checkpoint_choice(args.checkpoint)
    folder, every = args.references_dir, sorted(set(splits) | set(EVALUATED_SPLITS))
    references = (
        {s: os.path.join(folder, f"{s}.raw.{TARGET_LANG}") for s in every} if folder else {}
    )
    save_dir = os.path.join(args.run_dir, "checkpoints")
    inputs = evaluation_inputs(args.data_bin, save_dir, choice, references, args.beam)
    scores = evaluate_checkpoint(
        args.data_bin, save_dir, plugin_dir(), choice, splits, args.beam, args.batch_size,
        {s: references[s] for s in splits if s in references}, output_dir=args.run_dir,
    )  # fmt: skip
    path = os.path.join(args.run_dir, RESULTS_NAME)
    write_evaluation(path, scores, {**inputs, "batch_size": args.batch_size})
    for split in splits:
        print(f"{split}: BLEU {scores[split]['bleu']:.2f} ({TOKENIZED_BLEU_NOTE})  "
              f"sacreBLEU {scores[split]['sacrebleu']:.2f}")  # fmt: skip
    print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import run_command
    from .logs import log_to_stdout

    args = parser().parse_args(argv)
    log_to_stdout()
    return run_command(PROGRAM, lambda: work(args))
