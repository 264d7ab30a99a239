"""Lets an Adam checkpoint be resumed with --optimizer asam/sam (or back), keeping updates, LR
schedule and Adam's moments, also when the new run uses another precision.  Usage:

    python scripts/switch_optimizer.py checkpoint_last.pt asam_start.pt --optimizer asam [--fp16]
    fairseq-train ... --optimizer asam [--fp16] --restore-file asam_start.pt

Pass the precision flag the new run will use (--fp16, --fp16 --fp16-no-flatten-grads,
--memory-efficient-fp16, --amp, --bf16 for fairseq-hydra-train's common.bf16, or --fp32);
without one the checkpoint's own precision is kept.
"""

import argparse
import sys

from fairseq_asam.optimizer_switch import OPTIMIZER_CLASS_NAMES, CheckpointError, switch_optimizer

PRECISION_FLAGS = ("fp32", "fp16", "bf16", "memory-efficient-fp16", "amp")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", help="fairseq checkpoint saved with adam, sam or asam (any precision)"
    )
    parser.add_argument("target", help="where to write the switched checkpoint")
    parser.add_argument("--optimizer", required=True, choices=sorted(OPTIMIZER_CLASS_NAMES))
    precision = parser.add_mutually_exclusive_group()
    for flag in PRECISION_FLAGS:
        meaning = "no mixed precision" if flag == "fp32" else "--" + flag
        precision.add_argument(
            f"--{flag}",
            dest="precision",
            action="store_const",
            const=flag,
            help=f"the new run trains with {meaning}",
        )
    parser.add_argument(
        "--fp16-no-flatten-grads",
        action="store_true",
        help="with --fp16: the new run keeps one fp32 master copy per parameter",
    )
    args = parser.parse_args(argv)
    if args.fp16_no_flatten_grads and args.precision != "fp16":
        parser.error("--fp16-no-flatten-grads goes with --fp16")
    try:
        before, after = switch_optimizer(
            args.source,
            args.target,
            args.optimizer,
            args.precision,
            flatten=not args.fp16_no_flatten_grads,
        )
    except (OSError, CheckpointError) as e:
        print(f"switch_optimizer.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.target}: recorded optimizer {before} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
