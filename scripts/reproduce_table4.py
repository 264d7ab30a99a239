#!/usr/bin/env python
"""Reproduces Table 4 of the ASAM paper (IWSLT'14 De->En BLEU: Adam, Adam+SAM, Adam+ASAM).

    # the whole pipeline on a CPU in minutes, on a generated sample archive:
    python scripts/reproduce_table4.py --preset tiny --out runs/tiny
    # the paper's grid (3 optimizers x 3 seeds), one run per GPU:
    python scripts/reproduce_table4.py --preset paper --archive de-en.tgz --out runs/table4

Data preparation (skipped when <out>/data holds the data-bin), training (resumes from
checkpoint_last.pt; runs with a results.json are skipped), evaluation and report
(<out>/report/table4.md).  See fairseq_asam/table4.py and configs/README.md.  Bad input exits
with status 1 and one line on stderr, before any work starts.
"""
import argparse
import logging
import os
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_asam import evaluation, iwslt14, table4  # noqa: E402
from fairseq_asam.report import ReportError  # noqa: E402

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(table4.PRESETS), default="paper",
                        help="; ".join(f"{p.name}: {p.description}" for p in table4.PRESETS.values()))
    parser.add_argument("--out", help="output folder (default: runs/<preset>)")
    parser.add_argument("--archive", help="the IWSLT'14 de-en.tgz (tiny: a generated sample when omitted)")
    parser.add_argument("--data-bin", help="already binarized IWSLT'14 de-en data (skips preparation)")
    parser.add_argument("--optimizers", default=",".join(table4.OPTIMIZERS),
                        help=f"comma-separated subset of {','.join(table4.OPTIMIZERS)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's; paper: 1,2,3)")
    parser.add_argument("--max-update", type=int, help="override the preset's number of updates")
    parser.add_argument("--checkpoint", help="best, last or average:N (default: the preset's, best)")
    parser.add_argument("--fp16", action="store_true", help="train in fp16 (GPUs; for bf16 use fairseq-hydra-train)")
    parser.add_argument("--eval-bleu", action="store_true", help="log validation BLEU every epoch (BLEU plot)")
    parser.add_argument("--sharpness-rho", type=float,
                        help="also measure each run's adaptive sharpness (scripts/sharpness.py) at this ρ, "
                             "shown next to its BLEU in the report (costs a few minutes per run on CPU)")
    parser.add_argument("--config-dir", default=table4.CONFIG_DIR, help="folder of the argument files")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stdout, force=True)
    try:
        preset = table4.PRESETS[args.preset]
        config = table4.GridConfig(
            out_dir=os.path.abspath(args.out or os.path.join("runs", preset.name)),
            preset=preset,
            optimizers=table4.parse_optimizers(args.optimizers),
            seeds=table4.parse_seeds(args.seeds) if args.seeds is not None else None,
            archive=args.archive,
            data_bin=args.data_bin,
            max_update=args.max_update,
            fp16=args.fp16,
            eval_bleu=args.eval_bleu,
            checkpoint=args.checkpoint,
            sharpness_rho=args.sharpness_rho,
            config_dir=args.config_dir,
        )
        outputs = table4.run_grid(config)
    except (table4.Table4Error, evaluation.EvaluationError, iwslt14.Iwslt14DataError, ReportError) as error:
        print(f"reproduce_table4.py: error: {error}", file=sys.stderr)
        return 1
    if table4.report.TABLE_MARKDOWN in outputs:
        with open(outputs[table4.report.TABLE_MARKDOWN], encoding="utf-8") as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
