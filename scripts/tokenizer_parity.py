#!/usr/bin/env python
"""How many lines of the IWSLT'14 text the preparation's tokenizer (and plain sacremoses)
tokenize unlike Moses tokenizer.perl; a maintainer's check, it needs perl and a Moses checkout:

    python scripts/tokenizer_parity.py --moses-dir ~/mosesdecoder --archive de-en.tgz
"""

import argparse
import os
import subprocess
import tempfile

from sacremoses import MosesTokenizer

from fairseq_asam_experiments.prepare import LANGUAGES, MosesPerlTokenizer, extract_texts
from fairseq_asam_experiments.synthetic_data import build_sample_archive


def tokenizer_perl(moses_dir: str, lang: str, lines: list) -> list:
    """`lines` through `perl tokenizer.perl -l lang -threads 1` of the checkout `moses_dir`."""
    script = os.path.join(moses_dir, "scripts", "tokenizer", "tokenizer.perl")
    run = subprocess.run(
        ["perl", script, "-l", lang, "-threads", "1"],
        input="".join(line + "\n" for line in lines).encode("utf-8"),
        capture_output=True,
        check=True,
    )
    output = run.stdout.decode("utf-8").split("\n")[:-1]
    assert len(output) == len(lines), f"{script}: {len(output)} lines for {len(lines)}"
    return output


def tokenizer_parity(moses_dir: str, archive: str) -> dict:
    """{lang: (lines, ours differing from perl, plain sacremoses differing, examples)}."""
    texts, results = extract_texts(archive), {}
    for lang in LANGUAGES:
        lines = [x for (_, text_lang), text in texts.items() if text_lang == lang for x in text]
        perl = tokenizer_perl(moses_dir, lang, lines)
        ours, moses = list(map(MosesPerlTokenizer(lang).tokenize_line, lines)), MosesTokenizer(lang)
        plain = [moses.tokenize(x, return_str=True, escape=True) for x in lines]
        wrong = [(x, p, o) for x, p, o in zip(lines, perl, ours) if p != o]
        results[lang] = (len(lines), len(wrong), sum(map(str.__ne__, perl, plain)), wrong[:5])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moses-dir", required=True, help="a Moses checkout")
    parser.add_argument("--archive", help="de-en.tgz (default: a generated sample archive)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        archive = args.archive or build_sample_archive(os.path.join(folder, "de-en.tgz"))
        results = tokenizer_parity(args.moses_dir, archive)
    for lang, (lines, ours, plain, examples) in results.items():
        print(f"-l {lang}, {lines} lines; unlike tokenizer.perl: ours {ours}, sacremoses {plain}")
        print("".join("  line: {!r}\n  perl: {!r}\n  ours: {!r}\n".format(*x) for x in examples))


if __name__ == "__main__":
    main()
