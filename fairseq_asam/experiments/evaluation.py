"""BLEU of a trained fairseq translation model, as Table 4 reports it and as sacreBLEU does.

For every split (valid, test) one `fairseq-generate` run (beam 5, subword units removed) writes
`generate-<split>.txt` next to the checkpoints; from its `H-` (hypothesis) and `T-` (reference)
lines two scores are computed:

* `bleu`: tokenized BLEU, exactly fairseq-generate's / fairseq-score's `--scoring bleu`: corpus
  BLEU-4 without smoothing on the whitespace tokens of the Moses-tokenized, lowercased text,
  where an unknown reference word never matches.  This is the number of the paper's Table 4
  (and of fairseq's IWSLT'14 example).  The "BLEU4 = ..." line fairseq-generate prints must
  agree with it, which is checked.
* `sacrebleu`: detokenized sacreBLEU (13a tokenization, its signature recorded): hypotheses
  detokenized with sacremoses' MosesDetokenizer (for BPE output), scored against the
  untokenized references when a references file is given (`{split}.raw.en` of the IWSLT'14
  preparation), else against the detokenized `T-` lines.  The IWSLT'14 text is lowercased, so
  this is in effect case-insensitive sacreBLEU.

Checkpoint choice: `best` (lowest validation loss, fairseq's checkpoint_best.pt), `last`, or
`average:N`, the parameters averaged over the last N epoch checkpoints as fairseq's
scripts/average_checkpoints.py --num-epoch-checkpoints N does.
"""

import collections
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError, FairseqAsamError
from .files import atomic_output, write_json
from .prepare import SOURCE_LANG, TARGET_LANG

logger = logging.getLogger(__name__)

EVALUATED_SPLITS = ("valid", "test")
DEFAULT_BEAM = 5
DEFAULT_BATCH_SIZE = 128  # fairseq's IWSLT'14 example
DEFAULT_CHECKPOINT = "best"
# fairseq-generate flags that remove each kind of subword unit (the preparation's `subword`).
REMOVE_SUBWORD_FLAGS = {"bpe": ["--remove-bpe"], "sentencepiece": ["--remove-bpe", "sentencepiece"]}
NAMED_CHECKPOINTS = {"best": "checkpoint_best.pt", "last": "checkpoint_last.pt"}
AVERAGE_PREFIX = "average:"
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
    kind: str  # "best", "last" or "average"
    num_epochs: int = 0  # for "average": how many of the last epoch checkpoints

    def __str__(self) -> str:
        return f"{AVERAGE_PREFIX}{self.num_epochs}" if self.kind == "average" else self.kind


def parse_checkpoint_choice(text: str) -> CheckpointChoice:
    """`best`, `last` or `average:N` (N >= 1), as given to --checkpoint."""
    if text in NAMED_CHECKPOINTS:
        return CheckpointChoice(text)
    if text.startswith(AVERAGE_PREFIX):
        count = text[len(AVERAGE_PREFIX) :]
        if count.isdigit() and int(count) >= 1:
            return CheckpointChoice("average", int(count))
    raise ConfigError(f"--checkpoint must be best, last or average:N with N >= 1, got {text!r}")


def last_epoch_checkpoints(save_dir: str, count: int) -> List[str]:
    """The `count` newest `checkpoint<epoch>.pt` of `save_dir`, newest first (by epoch number)."""
    epochs = []
    for name in os.listdir(save_dir):
        match = EPOCH_CHECKPOINT.match(name)
        if match:
            epochs.append((int(match.group(1)), os.path.join(save_dir, name)))
    if len(epochs) < count:
        raise FairseqAsamError(
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
    if not paths:
        raise FairseqAsamError("no checkpoints to average")
    sums: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    keys = None
    first_state = None
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if first_state is None:
            first_state = state
        params = state["model"]
        if keys is None:
            keys = list(params)
        elif list(params) != keys:
            raise FairseqAsamError(
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


def resolve_checkpoint(save_dir: str, choice: CheckpointChoice) -> Tuple[str, List[str]]:
    """The checkpoint file to evaluate for `choice`, and the files it was made of.

    `average:N` writes `checkpoint_average<N>.pt` into `save_dir` (atomically).
    """
    if not os.path.isdir(save_dir):
        raise FairseqAsamError(f"checkpoint folder not found: {save_dir}")
    if choice.kind in NAMED_CHECKPOINTS:
        path = os.path.join(save_dir, NAMED_CHECKPOINTS[choice.kind])
        if not os.path.isfile(path):
            raise FairseqAsamError(f"--checkpoint {choice}: {path} not found")
        return path, [path]
    sources = last_epoch_checkpoints(save_dir, choice.num_epochs)
    path = os.path.join(save_dir, f"checkpoint_average{choice.num_epochs}.pt")
    logger.info(
        f"averaging {len(sources)} checkpoints into {path}: "
        f"{', '.join(map(os.path.basename, sources))}"
    )
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
        raise FairseqAsamError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise FairseqAsamError("no sentences to score")
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
    """sacreBLEU (default 13a tokenization) of detokenized text; returns (score, signature)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise FairseqAsamError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = sacrebleu.BLEU()
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
        raise FairseqAsamError(
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
    subword: str = "bpe",
    beam: int = DEFAULT_BEAM,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> List[str]:
    if subword not in REMOVE_SUBWORD_FLAGS:
        raise ConfigError(
            f"--subword must be one of {sorted(REMOVE_SUBWORD_FLAGS)}, got {subword!r}"
        )
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
        *REMOVE_SUBWORD_FLAGS[subword],
    ]


def run_generate(
    command: Sequence[str], output_path: str, env: Optional[Dict[str, str]] = None
) -> str:
    """Runs fairseq-generate into `output_path` (complete or absent: written atomically); the
    output of a failed run is kept as `<output_path>.failed` for the error message."""
    logger.info(f"generating {output_path}: {shlex.join(command)}")
    with atomic_output(output_path) as temporary:
        with open(temporary, "w", encoding="utf-8") as out:
            returncode = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if returncode != 0:
            failed = output_path + ".failed"
            os.replace(temporary, failed)
            raise FairseqAsamError(
                f"fairseq-generate failed with exit code {returncode}; see {failed}"
            )
    with open(output_path, encoding="utf-8") as f:
        return f.read()


def read_references(path: str, ids: Sequence[int]) -> List[str]:
    """Lines `ids` (0-based sentence ids) of a plain-text reference file."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if ids and max(ids) >= len(lines):
        raise FairseqAsamError(
            f"references file {path} has {len(lines)} lines, sentence id {max(ids)} needs more"
        )
    return [lines[i] for i in ids]


def score_split(
    output: GenerateOutput, subword: str, references_path: Optional[str] = None
) -> Dict:
    """Both BLEU scores of one parsed fairseq-generate output."""
    bleu, bleu_details = tokenized_bleu(output.hypotheses, output.references)
    if output.printed_bleu is not None and abs(output.printed_bleu - bleu) > PRINTED_BLEU_TOLERANCE:
        raise FairseqAsamError(
            f"recomputed BLEU {bleu:.4f} differs from fairseq-generate's "
            f"{output.printed_score_line!r}"
        )
    # BPE output is Moses-tokenized text; SentencePiece output is already untokenized.
    detokenize = moses_detokenize if subword == "bpe" else list
    hypotheses = detokenize(output.hypotheses)
    if references_path is not None:
        references = read_references(references_path, output.ids)
    else:
        references = detokenize(output.references)
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


def evaluate_checkpoint(
    data_bin: str,
    save_dir: str,
    user_dir: str,
    choice: CheckpointChoice = CheckpointChoice(DEFAULT_CHECKPOINT),
    splits: Sequence[str] = EVALUATED_SPLITS,
    subword: str = "bpe",
    beam: int = DEFAULT_BEAM,
    batch_size: int = DEFAULT_BATCH_SIZE,
    references: Optional[Dict[str, str]] = None,
    output_dir: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> Dict:
    """Generates and scores every split; a JSON-ready dict with every number and command.

    `references` maps a split to its untokenized reference file (optional, for sacreBLEU);
    generate outputs go to `output_dir` (default: the folder above `save_dir`).
    """
    check_data_bin(data_bin, splits)
    for split, path in (references or {}).items():
        if not os.path.isfile(path):
            raise FairseqAsamError(f"references file for {split} not found: {path}")
    checkpoint, sources = resolve_checkpoint(save_dir, choice)
    output_dir = output_dir or os.path.dirname(os.path.abspath(save_dir))
    results = {
        "checkpoint": {"choice": str(choice), "path": checkpoint, "sources": sources},
        "beam": beam,
        "subword": subword,
    }
    for split in splits:
        command = generate_command(data_bin, checkpoint, split, user_dir, subword, beam, batch_size)
        output_path = os.path.join(output_dir, GENERATE_FILE.format(split=split))
        output = parse_generate_output(run_generate(command, output_path, env))
        scores = score_split(output, subword, (references or {}).get(split))
        results[split] = {**scores, "command": shlex.join(command), "output": output_path}
        logger.info(
            f"{split}: BLEU {scores['bleu']:.2f} (tokenized, as Table 4), "
            f"sacreBLEU {scores['sacrebleu']:.2f} ({scores['sacrebleu_signature']})"
        )
    return results


def missing_data_files(data_bin: str, splits: Sequence[str] = EVALUATED_SPLITS) -> List[str]:
    """What `data_bin` lacks of fairseq-preprocess output for `splits`: dictionaries, indexes."""
    if not os.path.isdir(data_bin):
        return [data_bin]
    names = set(os.listdir(data_bin))
    missing = [
        f"dict.{lang}.txt" for lang in (SOURCE_LANG, TARGET_LANG) if f"dict.{lang}.txt" not in names
    ]
    return missing + [
        s for s in splits if not any(n.startswith(f"{s}.") and n.endswith(".idx") for n in names)
    ]


def check_data_bin(data_bin: str, splits: Sequence[str] = EVALUATED_SPLITS) -> None:
    """Raises unless `data_bin` holds fairseq-preprocess output for `splits`."""
    if not os.path.isdir(data_bin):
        raise FairseqAsamError(f"--data-bin: folder not found: {data_bin}")
    missing = missing_data_files(data_bin, splits)
    if missing:
        raise FairseqAsamError(
            f"--data-bin {data_bin} is not binarized data: missing {', '.join(missing)}"
        )


def update_results(path: str, entries: Dict) -> Dict:
    """Writes `entries` into the JSON file `path` (atomically), keeping its other entries."""
    results = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    results.update(entries)
    write_json(path, results)
    return results
