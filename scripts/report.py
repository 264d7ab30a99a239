#!/usr/bin/env python
"""Table 4 (Markdown, CSV) and plots from the runs of scripts/reproduce_table4.py (fairseq_asam/report.py).

    python scripts/report.py OUT_DIR [--report-dir DIR]

Reads OUT_DIR/runs/*/results.json and train.log; writes OUT_DIR/report/ (or --report-dir).
"""
import argparse
import logging
import os
import sys

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_asam import report  # noqa: E402

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="output folder of scripts/reproduce_table4.py (holds runs/)")
    parser.add_argument("--report-dir", help="where to write (default: OUT_DIR/report)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stdout, force=True)
    try:
        outputs = report.write_report(args.out_dir, args.report_dir)
    except report.ReportError as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 1
    if report.TABLE_MARKDOWN in outputs:
        with open(outputs[report.TABLE_MARKDOWN], encoding="utf-8") as f:
            print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
