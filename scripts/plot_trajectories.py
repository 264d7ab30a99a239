#!/usr/bin/env python
"""Draws SGD, SAM and ASAM paths on L = ½(1 − w₁w₂)² (fairseq_asam/trajectories.py) to a PNG.

    python scripts/plot_trajectories.py [--output docs/trajectories.png] [--lr 0.05] [--steps 400]
        [--sam-rho 0.2] [--asam-rho 0.5] [--eta 0.01]

Prints where every path ends and its loss there.
"""
import argparse
import logging
import os
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_asam import trajectories  # noqa: E402

# fairseq's wav2vec2_classification module calls logging.basicConfig(level=DEBUG) when imported.
logging.getLogger().setLevel(logging.WARNING)

DEFAULT_OUTPUT = os.path.join("docs", "trajectories.png")


def main(argv=None) -> int:
    defaults = trajectories.Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="PNG to write")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--sam-rho", type=float, default=defaults.sam_rho, help="SAM's radius ‖ε‖ <= ρ")
    parser.add_argument("--asam-rho", type=float, default=defaults.asam_rho, help="ASAM's radius ‖T⁻¹ε‖ <= ρ")
    parser.add_argument("--eta", type=float, default=defaults.eta, help="η in ASAM's T = |w| + η")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        print(f"plot_trajectories.py: error: --output {args.output}: its folder does not exist", file=sys.stderr)
        return 1
    settings = trajectories.Settings(args.lr, args.steps, args.sam_rho, args.asam_rho, args.eta)
    paths = trajectories.plot(args.output, trajectories.DEFAULT_STARTS, settings)
    print(f"{'start':>14} {'method':>6} {'end':>18} {'loss':>9}")
    for index, start in enumerate(trajectories.DEFAULT_STARTS):
        for method in trajectories.METHODS:
            end = paths[method][index, -1]
            print(f"{str(start):>14} {method:>6} ({end[0]:7.3f}, {end[1]:7.3f}) {trajectories.loss(end):9.2e}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
