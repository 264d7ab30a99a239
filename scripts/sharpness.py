#!/usr/bin/env python
"""Sharpness and adaptive sharpness of a fairseq checkpoint on its data (fairseq_asam/sharpness.py).

    python scripts/sharpness.py CHECKPOINT DATA_BIN --rho 0.05 [--subset valid] [--max-batches 20]
        [--measures adaptive plain] [--eta 0.01] [--normalize-biases] [--steps 10]
        [--device cuda] [--json sharpness.json]

Prints a table; --json also writes the report (atomically).  A bad argument exits with status 1
and one line on stderr, before anything is loaded.
"""
import argparse
import logging
import os
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fairseq_asam import sharpness  # noqa: E402
from fairseq_asam.optim import ConfigError  # noqa: E402

# fairseq's wav2vec2_classification module calls logging.basicConfig(level=DEBUG) when imported.
logging.getLogger().setLevel(logging.WARNING)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="fairseq checkpoint (.pt)")
    parser.add_argument("data", help="the checkpoint's data-bin folder")
    parser.add_argument("--rho", type=float, required=True, help="radius ρ of the ball ‖T⁻¹ε‖₂ <= ρ")
    parser.add_argument("--subset", default=sharpness.DEFAULT_SUBSET, help="split to measure on")
    parser.add_argument("--max-batches", type=int, default=sharpness.DEFAULT_MAX_BATCHES,
                        help="M: the first M batches of the subset, in fairseq's fixed order")
    parser.add_argument("--measures", nargs="+", default=list(sharpness.MEASURES),
                        help="adaptive (T = |w| + η) and/or plain (T = I)")
    parser.add_argument("--eta", type=float, default=sharpness.DEFAULT_ETA, help="η in T = |w| + η")
    parser.add_argument("--normalize-biases", action="store_true",
                        help="T = |w| + η on every tensor, not only on weights")
    parser.add_argument("--steps", type=int, default=sharpness.DEFAULT_STEPS,
                        help="K ascent steps (1: the SAM/ASAM one-step estimate)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if there is one)")
    parser.add_argument("--max-tokens", type=int, help="batch size in tokens (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, help="batch size in sentences (default: the checkpoint's)")
    parser.add_argument("--json", help="also write the report to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise FileNotFoundError(f"--json {args.json}: its folder does not exist")
        report = sharpness.measure_checkpoint(
            args.checkpoint, args.data, args.rho, subset=args.subset, max_batches=args.max_batches,
            measures=args.measures, eta=args.eta, normalize_biases=args.normalize_biases,
            steps=args.steps, device=args.device, max_tokens=args.max_tokens, batch_size=args.batch_size,
        )
    except (ConfigError, FileNotFoundError) as error:
        print(f"sharpness.py: error: {error}", file=sys.stderr)
        return 1
    print(sharpness.format_report(report))
    if args.json:
        sharpness.write_json_atomic(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
