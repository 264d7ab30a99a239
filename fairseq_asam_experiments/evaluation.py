"""BLEU of a trained fairseq translation model, tokenized (assumed Table 4's) and sacreBLEU.

For every split (valid, test) one `fairseq-generate` run (beam 5, subword units removed) writes
`generate-<split>.txt` next to the checkpoints; from its `H-` (hypothesis) and `T-` (reference)
lines two scores are computed:

* `bleu`: tokenized BLEU, exactly fairseq-generate's / fairseq-score's `--scoring bleu`: corpus
  BLEU-4 without smoothing on the whitespace tokens of the Moses-tokenized, lowercased text,
  where an unknown reference word never matches.  We assume this is the metric of the paper's
  Table 4 (the paper does not name its BLEU that we know of; it is what the evaluation command
  of fairseq's IWSLT'14 example prints).  The "BLEU4 = ..." line fairseq-generate prints must
  agree with it, which is checked.
* `sacrebleu`: detokenized, case-insensitive sacreBLEU (`BLEU(lowercase=True)`, 13a
  tokenization; its signature, `case:lc`, is recorded): hypotheses detokenized with sacremoses'
  MosesDetokenizer (for BPE output), scored against the untokenized references when a
  references file is given (`{split}.raw.en` of the IWSLT'14 preparation), else against the
  detokenized `T-` lines.  The IWSLT'14 preparation lowercases both sides.

Neither is the validation BLEU fairseq-train logs with --eval-bleu (what `best-bleu` selects
by): detokenized sacreBLEU of fairseq's own validation pass, with its batching, maximum length
and detokenizer; the report shows it beside these as "Valid BLEU (in-training)".

Checkpoint protocol (`--checkpoint`, see configs/README.md for the default and its evidence):
`best-bleu` (fairseq's checkpoint_best.pt of a run trained with in-training validation BLEU and
`--best-checkpoint-metric bleu --maximize-best-checkpoint-metric`), `best-loss`
(checkpoint_best.pt of a run selecting by validation loss, fairseq's default), `last`, or
`average:N`, the parameters averaged over the last N epoch checkpoints as fairseq's
scripts/average_checkpoints.py --num-epoch-checkpoints N does.  For the two `best-*` protocols
the metric recorded in the checkpoint's own config is checked: a checkpoint_best.pt selected by
loss is never reported as `best-bleu`, nor the other way round.

Every evaluation records its settings (`results.json` -> `evaluation`: protocol, beam, batch
size, references, data, and the size and modification time of the checkpoint
files it read) and their fingerprint; `write_results` replaces an evaluation made with other
settings as a whole and merges the splits of one made with the same settings, so a
results.json never mixes splits scored on different checkpoints.
"""

import collections
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import loading
from .errors import ExperimentError, SettingError
from .files import atomic_output, read_json_object, write_json
from .prepare import SOURCE_LANG, TARGET_LANG

logger = logging.getLogger(__name__)

EVALUATED_SPLITS = ("valid", "test")
DEFAULT_BEAM = 5
DEFAULT_BATCH_SIZE = 128  # fairseq's IWSLT'14 example
# The protocol of Table 4 as we read the paper (configs/README.md gives the evidence).
DEFAULT_CHECKPOINT = "best-bleu"
BEST_CHECKPOINT, LAST_CHECKPOINT = "checkpoint_best.pt", "checkpoint_last.pt"
# --checkpoint value -> the file it evaluates
NAMED_CHECKPOINTS = {
    "best-loss": BEST_CHECKPOINT,
    "best-bleu": BEST_CHECKPOINT,
    "last": LAST_CHECKPOINT,
}
# The `best-*` protocols -> fairseq's --best-checkpoint-metric the run must have selected by.
SELECTION_METRICS = {"best-loss": "loss", "best-bleu": "bleu"}
AVERAGE_PREFIX = "average:"
CHECKPOINT_CHOICES = "best-loss, best-bleu, last or average:N"
EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")
GENERATE_FILE = "generate-{split}.txt"
RESULTS_NAME = "results.json"
# fairseq-generate's last line: "Generate test with beam=5: BLEU4 = 34.86, 68.1/42.8/... (BP=...)"
GENERATE_SCORE_LINE = re.compile(r"^Generate (\S+) with beam=(\d+): (BLEU4 = ([0-9.]+),.*)$")
# Largest difference tolerated between the recomputed BLEU and fairseq-generate's printed one
# (which is rounded to 2 decimals).
PRINTED_BLEU_TOLERANCE = 0.006


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointChoice:
    kind: str  # "best-loss", "best-bleu", "last" or "average"
    num_epochs: int = 0  # for "average": how many of the last epoch checkpoints

    def __str__(self) -> str:
        """The --checkpoint value: the protocol's name in every report."""
        return f"{AVERAGE_PREFIX}{self.num_epochs}" if self.kind == "average" else self.kind

    @property
    def selection_metric(self) -> str:
        """The --best-checkpoint-metric the run trains with: bleu for `best-bleu`, else loss
        (fairseq's default; `last` and `average:N` do not read checkpoint_best.pt)."""
        return SELECTION_METRICS.get(self.kind, "loss")


def parse_checkpoint_choice(text: str) -> CheckpointChoice:
    """`best-loss`, `best-bleu`, `last` or `average:N` (N >= 1), as given to --checkpoint."""
    if text in NAMED_CHECKPOINTS:
        return CheckpointChoice(text)
    if text.startswith(AVERAGE_PREFIX):
        count = text[len(AVERAGE_PREFIX) :]
        if count.isdigit() and int(count) >= 1:
            return CheckpointChoice("average", int(count))
    if text == "best":
        raise SettingError(
            "--checkpoint best names no protocol: use best-loss (checkpoint_best.pt selected by "
            "validation loss) or best-bleu (selected by validation BLEU)"
        )
    raise SettingError(f"--checkpoint must be {CHECKPOINT_CHOICES} with N >= 1, got {text!r}")


def checkpoint_position(path: str) -> Dict[str, Optional[int]]:
    """{"epoch", "num_updates"} a fairseq checkpoint was saved at (None where not recorded)."""
    state = loading.read_checkpoint(path)
    history = state.get("optimizer_history") or [{}]
    iterator = (state.get("extra_state") or {}).get("train_iterator") or {}
    updates, epoch = history[-1].get("num_updates"), iterator.get("epoch")
    # fairseq records the epoch a resume starts: after an epoch's end, the next one.
    if epoch is not None and epoch > 1 and iterator.get("iterations_in_epoch") == 0:
        epoch -= 1
    return {
        "epoch": None if epoch is None else int(epoch),
        "num_updates": None if updates is None else int(updates),
    }


def checkpoint_selection_metric(path: str) -> Tuple[str, bool]:
    """(--best-checkpoint-metric, --maximize-best-checkpoint-metric) a fairseq checkpoint was
    saved under, read from its own config."""
    settings = loading.saved_settings(loading.read_checkpoint(path), "checkpoint")
    return (
        str(settings.get("best_checkpoint_metric", "loss")),
        bool(settings.get("maximize_best_checkpoint_metric", False)),
    )


def check_selection(path: str, choice: CheckpointChoice) -> Optional[str]:
    """For `best-loss`/`best-bleu`: raises unless checkpoint_best.pt at `path` was selected by
    that protocol's metric (in the right direction); returns the metric (None otherwise)."""
    wanted = SELECTION_METRICS.get(choice.kind)
    if wanted is None:
        return None
    metric, maximize = checkpoint_selection_metric(path)
    if metric != wanted or maximize != (wanted == "bleu"):
        direction = "highest" if maximize else "lowest"
        wanted_text = "highest validation BLEU" if wanted == "bleu" else "lowest validation loss"
        raise ExperimentError(
            f"--checkpoint {choice}: {path} was selected by the {direction} validation {metric} "
            f"(--best-checkpoint-metric {metric}), not by the {wanted_text}"
        )
    return metric


def last_epoch_checkpoints(save_dir: str, count: int) -> List[str]:
    """The `count` newest `checkpoint<epoch>.pt` of `save_dir`, newest first (by epoch number)."""
    epochs = []
    for name in os.listdir(save_dir):
        match = EPOCH_CHECKPOINT.match(name)
        if match:
            epochs.append((int(match.group(1)), os.path.join(save_dir, name)))
    if len(epochs) < count:
        raise ExperimentError(
            f"--checkpoint average:{count} needs {count} epoch checkpoints in {save_dir}, found "
            f"{len(epochs)} (train with --keep-last-epochs >= {count})"
        )
    return [path for _, path in sorted(epochs, reverse=True)[:count]]


def average_checkpoints(paths: Sequence[str]) -> dict:
    """fairseq's scripts/average_checkpoints.py: the mean of the `model` parameters of `paths`.

    Everything but `model` is taken from the first checkpoint.  Half-precision tensors are
    averaged in fp32; integer tensors (buffers) get the floor of the mean.  Checkpoints are
    fairseq's own (trusted), so they are unpickled in full.
    """
    import torch

    if not paths:
        raise ExperimentError("no checkpoints to average")
    sums: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    keys = None
    first_state = None
    for path in paths:
        state = loading.read_checkpoint(path)
        if first_state is None:
            first_state = state
        params = state["model"]
        if keys is None:
            keys = list(params)
        elif list(params) != keys:
            raise ExperimentError(
                f"{path} has other parameters than {paths[0]}; cannot average them"
            )
        for name, tensor in params.items():
            if tensor.dtype in (torch.float16, torch.bfloat16):
                tensor = tensor.float()
            if name in sums:
                sums[name] += tensor
            else:
                sums[name] = tensor.clone()
    for tensor in sums.values():
        if tensor.is_floating_point():
            tensor.div_(len(paths))
        else:
            tensor.floor_divide_(len(paths))
    first_state["model"] = sums
    return first_state


def checkpoint_inputs(save_dir: str, choice: CheckpointChoice) -> List[str]:
    """The checkpoint files `choice` reads (nothing is written): checkpoint_best.pt,
    checkpoint_last.pt, or the last N epoch checkpoints."""
    if not os.path.isdir(save_dir):
        raise ExperimentError(f"checkpoint folder not found: {save_dir}")
    if choice.kind in NAMED_CHECKPOINTS:
        path = os.path.join(save_dir, NAMED_CHECKPOINTS[choice.kind])
        if not os.path.isfile(path):
            raise ExperimentError(f"--checkpoint {choice}: {path} not found")
        return [path]
    return last_epoch_checkpoints(save_dir, choice.num_epochs)


def file_identity(path: str) -> Dict:
    """What tells one version of a file from another without reading it."""
    status = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


# sha256 of files already read, by (path, size, mtime, inode): a grid asks for the same data's
# identity once per run and stage.
_CONTENT_HASHES: Dict[Tuple, str] = {}
HASH_BLOCK_BYTES = 1 << 20
# What fairseq-train and fairseq-generate read of a data-bin (not preprocess.log, which names
# the temporary folder it was written to).
DATA_FILE = re.compile(r"^(dict\.[^.]+\.txt|.+\.(bin|idx))$")


def content_hash(path: str) -> str:
    """The sha256 of a file's bytes (16 hex digits), read again only when the file changed."""
    status = os.stat(path)
    key = (os.path.abspath(path), status.st_size, status.st_mtime_ns, status.st_ino)
    if key not in _CONTENT_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_BLOCK_BYTES), b""):
                digest.update(block)
        _CONTENT_HASHES[key] = digest.hexdigest()[:16]
    return _CONTENT_HASHES[key]


def data_identity(data_bin: str) -> Optional[str]:
    """What a data-bin holds, as one hash: the names and contents of its dictionaries and
    binarized splits (the same text binarized again gives the same hash, other text another
    one); None if the folder holds no such file (not prepared yet)."""
    if not os.path.isdir(data_bin):
        return None
    names = sorted(n for n in os.listdir(data_bin) if DATA_FILE.match(n))
    names = [n for n in names if os.path.isfile(os.path.join(data_bin, n))]
    if not names:
        return None
    return fingerprint({n: content_hash(os.path.join(data_bin, n)) for n in names})


def references_identity(references: Optional[Dict[str, str]]) -> Dict[str, Dict]:
    """{split: {"path", "sha256"}} of untokenized reference files (no hash for a missing one)."""
    identity = {}
    for split, path in sorted((references or {}).items()):
        entry = {"path": os.path.abspath(path)}
        if os.path.isfile(path):
            entry["sha256"] = content_hash(path)
        identity[split] = entry
    return identity


def resolve_checkpoint(save_dir: str, choice: CheckpointChoice) -> Tuple[str, List[str]]:
    """The checkpoint file to evaluate for `choice`, and the files it was made of.

    `best-loss`/`best-bleu` check the metric checkpoint_best.pt was selected by;
    `average:N` writes `checkpoint_average<N>.pt` into `save_dir` (atomically).
    """
    sources = checkpoint_inputs(save_dir, choice)
    if choice.kind in NAMED_CHECKPOINTS:
        check_selection(sources[0], choice)
        return sources[0], sources
    path = os.path.join(save_dir, f"checkpoint_average{choice.num_epochs}.pt")
    logger.info(
        f"averaging {len(sources)} checkpoints into {path}: "
        f"{', '.join(map(os.path.basename, sources))}"
    )
    import torch

    with atomic_output(path) as temporary:
        torch.save(average_checkpoints(sources), temporary)
    return path, sources


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Tuple[float, str]:
    """BLEU-4 as fairseq-generate / fairseq-score compute it; returns (score, result string).

    Lines are split on whitespace and mapped to ids by a fairseq Dictionary (as fairseq-generate
    does with `--remove-bpe`); fairseq's C scorer counts the n-grams, and the reference's
    `<unk>` never matches.
    """
    from fairseq.data import Dictionary
    from fairseq.scoring import bleu

    if len(hypotheses) != len(references):
        raise ExperimentError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ExperimentError("no sentences to score")
    vocabulary = Dictionary()
    scorer = bleu.Scorer(
        bleu.BleuConfig(pad=vocabulary.pad(), eos=vocabulary.eos(), unk=vocabulary.unk())
    )
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
    """Case-insensitive sacreBLEU (13a tokenization) of detokenized text; (score, signature)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ExperimentError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    # Both sides of IWSLT'14 are lowercased; lowercase=True makes the signature say so (case:lc).
    metric = sacrebleu.BLEU(lowercase=True)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return score.score, str(metric.get_signature())


# --------------------------------------------------------------------------------------------
# fairseq-generate
# --------------------------------------------------------------------------------------------


@dataclass
class GenerateOutput:
    hypotheses: List[str]  # H- lines (subword units removed), in sentence-id order
    references: List[str]  # T- lines, same order
    ids: List[int]
    printed_score_line: Optional[str]  # "BLEU4 = ..." of fairseq-generate's last line
    printed_bleu: Optional[float]  # its BLEU


def parse_generate_output(text: str) -> GenerateOutput:
    """Reads the `H-<id>\\t<score>\\t<text>` and `T-<id>\\t<text>` lines of fairseq-generate."""
    hypotheses: Dict[int, str] = {}
    references: Dict[int, str] = {}
    printed_line, printed_bleu = None, None
    for line in text.splitlines():
        if line.startswith("H-"):
            fields = line.split("\t")
            sentence_id = int(fields[0][2:])
            if sentence_id not in hypotheses:  # the first (best) of --nbest hypotheses
                hypotheses[sentence_id] = fields[2] if len(fields) > 2 else ""
        elif line.startswith("T-"):
            fields = line.split("\t")
            references[int(fields[0][2:])] = fields[1] if len(fields) > 1 else ""
        else:
            match = GENERATE_SCORE_LINE.match(line)
            if match:
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


def generate_command(
    data_bin: str,
    checkpoint: str,
    split: str,
    user_dir: str,
    beam: int = DEFAULT_BEAM,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> List[str]:
    return [
        sys.executable,
        "-m",
        "fairseq_cli.generate",
        data_bin,
        "--user-dir",
        user_dir,
        "--path",
        checkpoint,
        "--gen-subset",
        split,
        "--beam",
        str(beam),
        "--batch-size",
        str(batch_size),
        # fairseq-fixed 0.12.3.1 leaves out the sentences of the last batch when it is not a
        # multiple of --required-batch-size-multiple (default 8): with 1 every sentence is scored.
        "--required-batch-size-multiple",
        "1",
        "--remove-bpe",
    ]


# How a child process is run: `call(command, stdout=file, env=...) -> exit status`.  The runner
# passes its own, which registers the child so that Ctrl-C can stop it.
Call = Callable[..., int]


def default_call(command: Sequence[str], stdout, env: Optional[Dict[str, str]] = None) -> int:
    return subprocess.call(list(command), stdout=stdout, stderr=subprocess.STDOUT, env=env)


def exit_description(returncode: int) -> str:
    """`exit code 1`, or `signal 9 (SIGKILL)` for a child killed by a signal."""
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-returncode} ({name})"
    return f"exit code {returncode}"


def run_generate(
    command: Sequence[str],
    output_path: str,
    env: Optional[Dict[str, str]] = None,
    call: Call = default_call,
) -> str:
    """Runs fairseq-generate into `output_path` (complete or absent: written atomically); the
    output of a failed run is kept as `<output_path>.failed` for the error message."""
    logger.info(f"generating {output_path}: {shlex.join(command)}")
    with atomic_output(output_path) as temporary:
        with open(temporary, "w", encoding="utf-8") as out:
            returncode = call(command, stdout=out, env=env)
        if returncode != 0:
            failed = output_path + ".failed"
            os.replace(temporary, failed)
            how = "was stopped by" if returncode < 0 else "failed with"
            raise ExperimentError(
                f"fairseq-generate {how} {exit_description(returncode)}; see {failed}"
            )
    with open(output_path, encoding="utf-8") as f:
        return f.read()


def read_references(path: str, ids: Sequence[int]) -> List[str]:
    """Lines `ids` (0-based sentence ids) of a plain-text reference file."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if ids and max(ids) >= len(lines):
        raise ExperimentError(
            f"references file {path} has {len(lines)} lines, sentence id {max(ids)} needs more"
        )
    return [lines[i] for i in ids]


def score_split(output: GenerateOutput, references_path: Optional[str] = None) -> Dict:
    """Both BLEU scores of one parsed fairseq-generate output."""
    bleu, bleu_details = tokenized_bleu(output.hypotheses, output.references)
    if output.printed_bleu is not None and abs(output.printed_bleu - bleu) > PRINTED_BLEU_TOLERANCE:
        raise ExperimentError(
            f"recomputed BLEU {bleu:.4f} differs from fairseq-generate's "
            f"{output.printed_score_line!r}"
        )
    hypotheses = moses_detokenize(output.hypotheses)  # BPE removed: Moses-tokenized text
    if references_path is not None:
        references = read_references(references_path, output.ids)
    else:
        references = moses_detokenize(output.references)
    sacre, signature = detokenized_sacrebleu(hypotheses, references)
    return {
        "bleu": round(bleu, 4),
        "bleu_details": bleu_details,
        "fairseq_generate_bleu": output.printed_score_line,
        "sacrebleu": round(sacre, 4),
        "sacrebleu_signature": signature,
        "sacrebleu_references": references_path or "detokenized T- lines of fairseq-generate",
        "sentences": len(output.ids),
    }


def fingerprint(settings: Dict) -> str:
    """A short hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def evaluation_settings(
    data_bin: str,
    save_dir: str,
    choice: CheckpointChoice,
    beam: int = DEFAULT_BEAM,
    batch_size: int = DEFAULT_BATCH_SIZE,
    references: Optional[Dict[str, str]] = None,
) -> Dict:
    """Everything an evaluation's numbers depend on, the checkpoint files' versions included
    (so that a checkpoint trained further is evaluated again), with its fingerprint."""
    settings = {
        "protocol": str(choice),
        "beam": beam,
        "batch_size": batch_size,
        "references": references_identity(references),
        "data_bin": os.path.abspath(data_bin),
        "data_content": data_identity(data_bin),
        "checkpoint_files": [file_identity(p) for p in checkpoint_inputs(save_dir, choice)],
    }
    return {**settings, "fingerprint": fingerprint(settings)}


def evaluate_checkpoint(
    data_bin: str,
    save_dir: str,
    user_dir: str,
    choice: CheckpointChoice = CheckpointChoice(DEFAULT_CHECKPOINT),
    splits: Sequence[str] = EVALUATED_SPLITS,
    beam: int = DEFAULT_BEAM,
    batch_size: int = DEFAULT_BATCH_SIZE,
    references: Optional[Dict[str, str]] = None,
    output_dir: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    call: Call = default_call,
) -> Dict:
    """Generates and scores every split; a JSON-ready dict with every number and command, and
    the `evaluation` settings it was made with (`evaluation_settings`).

    `references` maps a split to its untokenized reference file (optional, for sacreBLEU);
    generate outputs go to `output_dir` (default: the folder above `save_dir`).
    """
    check_data_bin(data_bin, splits)
    for split, path in (references or {}).items():
        if not os.path.isfile(path):
            raise ExperimentError(f"references file for {split} not found: {path}")
    settings = evaluation_settings(data_bin, save_dir, choice, beam, batch_size, references)
    checkpoint, sources = resolve_checkpoint(save_dir, choice)
    output_dir = output_dir or os.path.dirname(os.path.abspath(save_dir))
    results = {
        "protocol": str(choice),
        "evaluation": settings,
        "checkpoint": {
            "choice": str(choice),
            "path": checkpoint,
            "sources": sources,
            "selected_by": SELECTION_METRICS.get(choice.kind),
            # where it was saved (an average: its newest source)
            **checkpoint_position(sources[0]),
        },
        "beam": beam,
        "scored_splits": list(splits),
    }
    for split in splits:
        command = generate_command(data_bin, checkpoint, split, user_dir, beam, batch_size)
        output_path = os.path.join(output_dir, GENERATE_FILE.format(split=split))
        output = parse_generate_output(run_generate(command, output_path, env, call))
        scores = score_split(output, (references or {}).get(split))
        results[split] = {**scores, "command": shlex.join(command), "output": output_path}
        logger.info(
            f"{split}: BLEU {scores['bleu']:.2f} (tokenized, assumed Table 4's metric), "
            f"sacreBLEU {scores['sacrebleu']:.2f} ({scores['sacrebleu_signature']})"
        )
    return results


def missing_data_files(data_bin: str, splits: Sequence[str] = EVALUATED_SPLITS) -> List[str]:
    """What `data_bin` lacks of fairseq-preprocess output for `splits`: dictionaries, indexes."""
    if not os.path.isdir(data_bin):
        return [data_bin]
    present = set(os.listdir(data_bin)) | set(loading.binarized_splits(data_bin))
    wanted = [f"dict.{lang}.txt" for lang in (SOURCE_LANG, TARGET_LANG)] + list(splits)
    return [name for name in wanted if name not in present]


def check_data_bin(data_bin: str, splits: Sequence[str] = EVALUATED_SPLITS) -> None:
    """Raises unless `data_bin` holds fairseq-preprocess output for `splits`."""
    if not os.path.isdir(data_bin):
        raise ExperimentError(f"--data-bin: folder not found: {data_bin}")
    missing = missing_data_files(data_bin, splits)
    if missing:
        raise ExperimentError(
            f"--data-bin {data_bin} is not binarized data: missing {', '.join(missing)}"
        )


# Entries of results.json that belong to one evaluation (besides its splits); the sharpness of
# the evaluated checkpoint goes with them.
EVALUATION_KEYS = ("protocol", "evaluation", "checkpoint", "beam", "scored_splits")
DEPENDENT_KEYS = ("sharpness", "sharpness_settings")


def read_results(path: str) -> Dict:
    """results.json as a dict ({} when it does not exist)."""
    try:
        return read_json_object(path) or {}
    except ExperimentError as error:
        raise ExperimentError(f"{error} (delete it to evaluate the run again)") from error


def write_results(path: str, evaluated: Dict) -> Dict:
    """Writes the output of `evaluate_checkpoint` into results.json (atomically).

    An earlier evaluation with the same settings (fingerprint) keeps the splits this one did
    not score (`--splits valid`, then `--splits test`); one with other settings is replaced
    whole, with every split and the sharpness it had, so that no split of another checkpoint
    or protocol is left beside the new ones.  Entries that are not an evaluation's (the run's
    name, its training settings) are kept.
    """
    results = read_results(path)
    previous = results.get("evaluation", {}).get("fingerprint")
    if previous == evaluated["evaluation"]["fingerprint"]:
        merged = sorted(set(results.get("scored_splits", [])) | set(evaluated["scored_splits"]))
        evaluated = {**evaluated, "scored_splits": merged}
    else:
        stale = set(results.get("scored_splits", [])) | set(EVALUATED_SPLITS)
        for key in list(EVALUATION_KEYS) + list(DEPENDENT_KEYS) + sorted(stale):
            results.pop(key, None)
    results.update(evaluated)
    write_json(path, results)
    return results


def evaluation_done(
    results: Dict, settings: Dict, splits: Sequence[str] = EVALUATED_SPLITS
) -> bool:
    """Whether `results` holds an evaluation with `settings` (same fingerprint) that scored
    every one of `splits`: a results.json with one split only is not done."""
    if results.get("evaluation", {}).get("fingerprint") != settings["fingerprint"]:
        return False
    return all(isinstance(results.get(s), dict) and "bleu" in results[s] for s in splits)


def drop_results(path: str, keys: Sequence[str]) -> Dict:
    """Removes `keys` from the JSON file `path` (atomically), keeping its other entries: a stage
    about to be redone first drops its old output, so that a failed redo leaves none behind."""
    results = read_results(path)
    if any(key in results for key in keys):
        results = {k: v for k, v in results.items() if k not in keys}
        write_json(path, results)
    return results


def drop_evaluation(path: str) -> Dict:
    """Removes the evaluation (its settings, every split, the sharpness that depends on it)."""
    results = read_results(path)
    stale = set(results.get("scored_splits", [])) | set(EVALUATED_SPLITS)
    return drop_results(path, list(EVALUATION_KEYS) + list(DEPENDENT_KEYS) + sorted(stale))


def evaluation_out_of_date(results: Dict, save_dir: str) -> Optional[str]:
    """Why the evaluation recorded in `results` no longer describes the files it scored, or None.

    For the report, which must not drop results over what it cannot check: each part is
    compared only where its file is still there.  A checkpoint file is looked up by name in
    `save_dir` (so a run folder moved with its timestamps, `mv` or `cp -a`, stays current) and
    compared by size and modification time; the data-bin and the references by content.  A
    checkpoint pruned after the evaluation, or a data folder no longer at its path, is not a
    change.  (The runner compares the whole fingerprint and evaluates again on any difference.)
    """
    recorded = results.get("evaluation")
    if not isinstance(recorded, dict) or "protocol" not in recorded:
        return "no evaluation settings recorded"
    for entry in recorded.get("checkpoint_files") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            return "its record of the checkpoint files is not readable"
        path = os.path.join(save_dir, os.path.basename(entry["path"]))
        if os.path.isfile(path):
            status = os.stat(path)
            if (status.st_size, status.st_mtime_ns) != (entry.get("bytes"), entry.get("mtime_ns")):
                return f"{os.path.basename(path)} changed after the evaluation"
    data_bin = recorded.get("data_bin")
    if data_bin and os.path.isdir(data_bin):
        if recorded.get("data_content") != data_identity(data_bin):
            return f"{data_bin} holds other data than at the evaluation"
    references = recorded.get("references") or {}
    for split, entry in references.items() if isinstance(references, dict) else ():
        path = entry.get("path") if isinstance(entry, dict) else None
        if path and os.path.isfile(path) and entry.get("sha256") != content_hash(path):
            return f"the {split} references ({path}) changed after the evaluation"
    return None


def update_results(path: str, entries: Dict) -> Dict:
    """Writes `entries` into the JSON file `path` (atomically), keeping its other entries."""
    results = read_results(path)
    results.update(entries)
    write_json(path, results)
    return results


# TEMPORARY (branch launch, until the eval helper's evaluation.py is merged): its API, on the
# code above.  The merge takes the eval helper's file; delete this block.
def evaluation_inputs(data_bin, save_dir, choice, references=None) -> Dict:
    return evaluation_settings(data_bin, save_dir, choice, references=references)
