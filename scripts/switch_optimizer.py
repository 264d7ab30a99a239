"""Lets an Adam checkpoint be resumed with --optimizer asam/sam (or back), keeping updates, LR
schedule and Adam's moments.  Usage:

    python scripts/switch_optimizer.py checkpoint_last.pt asam_start.pt --optimizer asam
    fairseq-train ... --optimizer asam --restore-file asam_start.pt
"""
import argparse
import sys

from fairseq_asam.checkpoint import OPTIMIZER_CLASS_NAMES, switch_optimizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="fairseq checkpoint saved with adam, sam or asam")
    parser.add_argument("target", help="where to write the switched checkpoint")
    parser.add_argument("--optimizer", required=True, choices=sorted(OPTIMIZER_CLASS_NAMES))
    args = parser.parse_args(argv)
    try:
        previous = switch_optimizer(args.source, args.target, args.optimizer)
    except (OSError, ValueError) as e:
        print(f"switch_optimizer.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.target}: optimizer {previous} -> {OPTIMIZER_CLASS_NAMES[args.optimizer]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
