"""Progress to stdout in fairseq's format: the console commands' and the cluster jobs' logging."""

import logging
import sys

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq's
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def log_to_stdout(level: int = logging.INFO) -> None:
    """Progress to stdout, so that stderr holds only a failure; `force`: importing fairseq
    already configured logging (its wav2vec2_classification module at DEBUG level)."""
    logging.basicConfig(
        format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, level=level, stream=sys.stdout, force=True
    )
