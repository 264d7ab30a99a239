#!/usr/bin/env python
"""Prepares IWSLT'14 German-English for fairseq, as examples/translation/prepare-iwslt14.sh does.

    python scripts/prepare_iwslt14.py --workdir data                 # downloads de-en.tgz
    python scripts/prepare_iwslt14.py --workdir data --archive de-en.tgz
    python scripts/prepare_iwslt14.py --workdir data --sample        # small generated archive

The binarized data ends up in WORKDIR/data-bin/iwslt14.tokenized.de-en; the recipe is described
in fairseq_asam/iwslt14.py. An unusable archive or flag ends the run with one line on stderr and
exit code 1.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_asam import iwslt14  # noqa: E402  (after the path set-up above)

SAMPLE_ARCHIVE = os.path.join("orig", "sample-de-en.tgz")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", help="a local de-en.tgz (default: download it to WORKDIR/orig/)")
    source.add_argument("--sample", action="store_true",
                        help=f"generate a small archive in the real layout at WORKDIR/{SAMPLE_ARCHIVE} and use it")
    parser.add_argument("--workdir", default=".", help="where the outputs go (default: the current folder)")
    parser.add_argument("--subword", choices=iwslt14.SUBWORD_METHODS, default="bpe",
                        help="bpe: subword-nmt as the recipe; sentencepiece: a joint SentencePiece model")
    parser.add_argument("--bpe-merges", type=int, default=iwslt14.DEFAULT_BPE_MERGES,
                        help="BPE merges, or the SentencePiece vocabulary size (default: %(default)s)")
    parser.add_argument("--joined-dictionary", action="store_true", help="one dictionary for both languages")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: %(default)s)")
    parser.add_argument("--expect-real-counts", action=argparse.BooleanOptionalAction, default=None,
                        help="check the real corpus's 160,239 / 7,283 / 6,750 pairs (default: for corpora "
                             f"of at least {iwslt14.REAL_CORPUS_MIN_PAIRS:,} cleaned training pairs)")
    parser.add_argument("--download-url", default=iwslt14.DOWNLOAD_URL, help="where to download de-en.tgz from")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Progress goes to stdout, so that stderr holds only a failure; `force`: importing fairseq
    # already configured logging to stderr.
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    archive = args.archive
    if args.sample:
        archive = iwslt14.build_sample_archive(os.path.join(args.workdir, SAMPLE_ARCHIVE))
    try:
        data_bin = iwslt14.prepare_iwslt14(
            archive,
            args.workdir,
            subword=args.subword,
            bpe_merges=args.bpe_merges,
            joined_dictionary=args.joined_dictionary,
            workers=args.workers,
            expect_real_counts=args.expect_real_counts,
            download_url=args.download_url,
        )
    except iwslt14.Iwslt14DataError as exc:
        print("prepare_iwslt14: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 1
    print(data_bin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
