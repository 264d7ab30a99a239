#!/usr/bin/env python
"""BLEU of a trained run on IWSLT'14 valid and test (fairseq_asam/evaluation.py).

    python scripts/evaluate.py RUN_DIR --data-bin DATA_BIN [--checkpoint best|last|average:N]
        [--references-dir DIR] [--splits valid,test] [--beam 5] [--batch-size 128] [--subword bpe]

Evaluates RUN_DIR/checkpoints/ with fairseq-generate, writes RUN_DIR/generate-<split>.txt and
the scores into RUN_DIR/results.json (atomically; other entries of that file are kept).
Bad input exits with status 1 and one line on stderr.
"""
import argparse
import logging
import os
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fairseq_asam  # noqa: E402
from fairseq_asam import evaluation  # noqa: E402

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder holding checkpoints/")
    parser.add_argument("--data-bin", required=True, help="the binarized data the run trained on")
    parser.add_argument("--checkpoint", default=evaluation.DEFAULT_CHECKPOINT, help="best, last or average:N")
    parser.add_argument("--splits", default=",".join(evaluation.SPLITS), help="comma-separated splits")
    parser.add_argument("--references-dir", help="folder of untokenized references <split>.raw.en for sacreBLEU "
                        "(prepare_iwslt14's iwslt14.tokenized.de-en/tmp); default: the detokenized T- lines")
    parser.add_argument("--beam", type=int, default=evaluation.DEFAULT_BEAM)
    parser.add_argument("--batch-size", type=int, default=evaluation.DEFAULT_BATCH_SIZE)
    parser.add_argument("--subword", choices=sorted(evaluation.REMOVE_SUBWORD_FLAGS), default="bpe",
                        help="subword units of the data (prepare_iwslt14's subword)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stdout, force=True)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    references = None
    if args.references_dir is not None:
        references = {s: os.path.join(args.references_dir, f"{s}.raw.{evaluation.TARGET_LANG}") for s in splits}
    try:
        scores = evaluation.evaluate_checkpoint(
            args.data_bin, os.path.join(args.run_dir, "checkpoints"), fairseq_asam.USER_DIR,
            evaluation.parse_checkpoint_choice(args.checkpoint), splits, args.subword, args.beam,
            args.batch_size, references, output_dir=args.run_dir,
        )
    except evaluation.EvaluationError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 1
    path = os.path.join(args.run_dir, evaluation.RESULTS_NAME)
    evaluation.update_results(path, scores)
    for split in splits:
        print(f"{split}: BLEU {scores[split]['bleu']:.2f}  sacreBLEU {scores[split]['sacrebleu']:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
