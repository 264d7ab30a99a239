"""IWSLT'14 German-English as fairseq's `examples/translation/prepare-iwslt14.sh` does, in Python
(docs/table4.md#the-steps): from `de-en.tgz` to `<data_root>/iwslt14-de-en-<archive MD5, 10
hex>-bpe<merges>/`, each step's text beside `data-bin/`, and `{split}.raw.{lang}`, the same pairs
untokenized and lowercased: sacreBLEU's references.  The folder is built under a temporary name
and renamed when complete, so a folder of that name is a finished preparation.
"""

import argparse
import gzip
import hashlib
import http.client
import io
import logging
import os
import re
import shutil
import tarfile
import urllib.request
import zlib
from typing import Dict, List, Sequence, Tuple

import regex
from sacremoses import MosesTokenizer
from sacremoses.corpus import NonbreakingPrefixes
from subword_nmt.apply_bpe import BPE
from subword_nmt.learn_bpe import learn_bpe

from . import synthetic_data
from .cli import run_command
from .errors import ExperimentError, SettingError
from .files import atomic_output, temporary_name, write_lines, write_text
from .synthetic_data import ARCHIVE_FOLDER, LANGUAGES, TEST_STEMS, TRAIN_STEM  # the layout

logger = logging.getLogger(__name__)

PROGRAM = "fairseq-asam-prepare"
SOURCE_LANG, TARGET_LANG = LANGUAGES
SPLITS = ("train", "valid", "test")
DATA_BIN = "data-bin"
DEFAULT_BPE_MERGES = 10000
# fairseq's mirror of the WIT3 archive (wit3.fbk.eu is gone); its MD5 as other scripts give it.
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
ARCHIVE_MD5 = "10936dfdf616504ddbd844e91b94ef4a"
ARCHIVE_NAME, SAMPLE_ARCHIVE_NAME = "de-en.tgz", "sample-de-en.tgz"

MEMBERS = {  # (stem, lang): the archive's member
    (stem, lang): f"{ARCHIVE_FOLDER}/{stem}.{lang}" + ("" if stem == TRAIN_STEM else ".xml")
    for stem in (TRAIN_STEM,) + TEST_STEMS
    for lang in LANGUAGES
}
TRAIN_DROPPED_TAGS = ("<url>", "<talkid>", "<keywords>")
TRAIN_DELETED_TAGS = re.compile("</?(title|description)>")
# sed 's/<seg id="[0-9]*">\s*//g' and 's/\s*<\/seg>\s*//g', with GNU sed's \s in a UTF-8 locale
# (glibc's iswspace: no-break spaces excluded).
SED_SPACE = "[ \t\n\r\f\v\u1680\u2000-\u2006\u2008-\u200a\u2028\u2029\u205f\u3000]"
SEG_OPEN = re.compile(f'<seg id="[0-9]*">{SED_SPACE}*')
SEG_CLOSE = re.compile(f"{SED_SPACE}*</seg>{SED_SPACE}*")
# clean-corpus-n.perl -ratio 1.5 ... 1 175, and its default -max-word-length 1000
CLEAN_RATIO, CLEAN_MIN_TOKENS, CLEAN_MAX_TOKENS, CLEAN_MAX_TOKEN_CHARS = 1.5, 1, 175, 1000
VALID_EVERY = 23
REAL_COUNTS = {"train": 160239, "valid": 7283, "test": 6750}

# Perl's \s on character strings; Python's \s also matches \x1c-\x1f, which perl deletes as junk.
PERL_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
PERL_SPACE_RUN = regex.compile(f"[{PERL_SPACE}]+")
PERL_BLANK_LINE = regex.compile(f"[{PERL_SPACE}]*")
ASCII_CONTROL = regex.compile(r"[\x00-\x1f]")
# Perl's \p{IsAlnum}, \p{IsAlpha}, \p{IsN} (XPosixAlnum = Alphabetic + Nd, ...).
IS_ALNUM, IS_ALPHA, IS_N = r"\p{Alphabetic}\p{Nd}", r"\p{Alphabetic}", r"\p{N}"
HAS_ALPHA = regex.compile(f"[{IS_ALPHA}]")
STARTS_LOWER = regex.compile(r"\p{Lowercase}")
STARTS_ASCII_DIGIT = regex.compile(r"[0-9]")
NUMERIC_ONLY_PREFIX = regex.compile(r"(.*)[" + PERL_SPACE + r"]+#NUMERIC_ONLY#")


class MosesPerlTokenizer(MosesTokenizer):
    """sacremoses' MosesTokenizer made to agree with tokenizer.perl as prepare-iwslt14.sh runs it
    (`-l de`/`-l en`, escaping on), one line at a time. Where sacremoses 0.2 differs: the last
    word of a line always loses its final period (`u.s.a.` -> `u.s.a .`; `...` stays whole);
    character classes are perl's Unicode properties (sacremoses' tables miss CJK ideographs,
    Georgian lowercase letters, many numbers, and add Indic viramas to the letters); \\x1c-\\x1f
    are deleted as control characters; a line of whitespace only is returned unchanged."""

    PAD_NOT_ISALNUM = regex.compile(f"([^{IS_ALNUM}{PERL_SPACE}.'`,\\-])"), r" \1 "
    COMMA_SEPARATE_1 = regex.compile(f"([^{IS_N}])[,]"), r"\1 , "
    COMMA_SEPARATE_2 = regex.compile(f"[,]([^{IS_N}])"), r" , \1"
    COMMA_SEPARATE_3 = regex.compile(f"([{IS_N}])[,]$"), r"\1 , "
    ENGLISH_SPECIFIC_APOSTROPHE = [
        (regex.compile(f"([^{IS_ALPHA}])[']([^{IS_ALPHA}])"), r"\1 ' \2"),
        (regex.compile(f"([^{IS_ALPHA}{IS_N}])[']([{IS_ALPHA}])"), r"\1 ' \2"),
        (regex.compile(f"([{IS_ALPHA}])[']([^{IS_ALPHA}])"), r"\1 ' \2"),
        (regex.compile(f"([{IS_ALPHA}])[']([{IS_ALPHA}])"), r"\1 '\2"),
        (regex.compile(f"([{IS_N}])[']([s])"), r"\1 '\2"),
    ]

    def __init__(self, lang: str):
        super().__init__(lang=lang)
        self.numeric_only = {}  # each non-breaking prefix: True if it is one only before a number
        for item in NonbreakingPrefixes().words(lang):  # a later line wins, as in perl
            numeric = NUMERIC_ONLY_PREFIX.search(item)
            self.numeric_only[numeric.group(1) if numeric else item] = bool(numeric)

    def handles_nonbreaking_prefixes(self, text: str) -> str:
        words = text.split(" ")
        while words and not words[-1]:  # perl's split drops trailing empty fields only
            words.pop()
        last = len(words) - 1
        for i, word in enumerate(words):
            if len(word) < 2 or not word.endswith("."):
                continue
            prefix, next_word = word[:-1], words[i + 1] if i < last else ""
            numeric_only = self.numeric_only.get(prefix)  # None: not a non-breaking prefix
            kept = i < last and (  # the last word always loses its period
                ("." in prefix and HAS_ALPHA.search(prefix))
                or numeric_only is False
                or STARTS_LOWER.match(next_word)
                or (numeric_only and STARTS_ASCII_DIGIT.match(next_word))
            )
            if not kept:
                words[i] = prefix + " ."
        return " ".join(words)

    def tokenize_line(self, line: str) -> str:
        """One line (without its newline) as tokenizer.perl prints it (without the newline)."""
        if PERL_BLANK_LINE.fullmatch(line):
            return line
        text = ASCII_CONTROL.sub("", PERL_SPACE_RUN.sub(" ", line))
        text = " ".join(word for word in text.split(" ") if word)
        return self.tokenize(text, return_str=True, escape=True)


def perl_lowercase(text: str) -> str:
    """perl's lc: Python's lower() except that capital sigma is always σ (no final ς)."""
    return text.replace("\u03a3", "\u03c3").lower()


def perl_normalize_space(line: str) -> str:
    """s/\\s+/ /g; s/^ //; s/ $// with perl's \\s."""
    return PERL_SPACE_RUN.sub(" ", line).strip(" ")


def training_text(lines: Sequence[str]) -> List[str]:
    """grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>' | sed -e 's/<title>//g' ..."""
    kept = (line for line in lines if not any(tag in line for tag in TRAIN_DROPPED_TAGS))
    return [TRAIN_DELETED_TAGS.sub("", line) for line in kept]


def segment_text(lines: Sequence[str]) -> List[str]:
    """grep '<seg id' | sed (seg tags removed) | sed "s/’/'/g"."""
    segments = [line for line in lines if "<seg id" in line]
    return [SEG_CLOSE.sub("", SEG_OPEN.sub("", x)).replace("\u2019", "'") for x in segments]


def extract_texts(archive: str) -> Dict[Tuple[str, str], List[str]]:
    """The text the recipe tokenizes (lines split at \\n only, as sed's), keyed (stem, lang) as
    MEMBERS; an `ExperimentError` naming the archive unless every member is there, complete and
    UTF-8, with as many lines per side."""
    try:
        with open(archive, "rb") as raw:  # all of it: a truncated archive fails the gzip CRC
            tar = tarfile.open(fileobj=io.BytesIO(gzip.decompress(raw.read())))
        files = {os.path.normpath(member.name): member for member in tar if member.isfile()}
        data = {key: tar.extractfile(files[name]).read().decode() for key, name in MEMBERS.items()}
    except KeyError as exc:
        raise ExperimentError(f"{archive}: missing member {exc.args[0]}") from None
    except UnicodeDecodeError as exc:
        raise ExperimentError(f"{archive}: a member is not UTF-8 ({exc})") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ExperimentError(f"{archive}: corrupt or truncated archive ({exc})") from None
    texts = {}
    for (stem, lang), name in MEMBERS.items():
        extract = training_text if stem == TRAIN_STEM else segment_text
        lines = texts[stem, lang] = extract(data[stem, lang].removesuffix("\n").split("\n"))
        source = texts[stem, SOURCE_LANG]  # read before the target side
        if len(lines) != len(source):
            raise ExperimentError(
                f"{archive}: {MEMBERS[stem, SOURCE_LANG]} has {len(source)} text lines "
                f"but {name} has {len(lines)}"
            )
    return texts


def file_md5(path: str) -> str:
    with open(path, "rb") as data:
        return hashlib.file_digest(data, "md5").hexdigest()


def download_archive(url: str, destination: str, md5: str = ARCHIVE_MD5) -> str:
    """`destination`, downloaded from `url` unless it exists: only whole (http.client's read()
    checks the announced size) and of MD5 `md5`; nothing is kept of a failed download."""
    if os.path.exists(destination):
        return destination
    try:
        with atomic_output(destination) as temporary:
            with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as f:
                f.write(response.read())
            digest = file_md5(temporary)
            if digest != md5:
                raise ExperimentError(
                    f"downloaded from {url}: MD5 {digest} differs from the expected {md5}; "
                    "removed; --download-md5 for another mirror's file, or a local --archive"
                )
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise ExperimentError(
            f"{url}: download failed ({exc}); run again to retry, or pass a local --archive"
        ) from None
    return destination


def clean_corpus(src_lines: Sequence[str], tgt_lines: Sequence[str]) -> List[Tuple[int, str, str]]:
    """clean-corpus-n.perl -ratio 1.5 ... 1 175: the kept pairs as (index, source, target),
    whitespace-normalized (its factor separator | never occurs: the tokenizer escapes it)."""
    kept = []
    for index, pair in enumerate(zip(src_lines, tgt_lines)):
        src, tgt = (perl_normalize_space(line) for line in pair)
        words = src.split(" ") if src else [], tgt.split(" ") if tgt else []
        sizes = [len(side) for side in words]
        if (
            all(CLEAN_MIN_TOKENS <= size <= CLEAN_MAX_TOKENS for size in sizes)
            and max(sizes) <= CLEAN_RATIO * min(sizes)
            and max(map(len, words[0] + words[1])) <= CLEAN_MAX_TOKEN_CHARS
        ):
            kept.append((index, src, tgt))
    return kept


def split_corpus(texts: Dict) -> Dict[Tuple[str, str, str], List[str]]:
    """{(split, "tok" or "raw", lang): lines} of `extract_texts`' output, tokenized and split."""
    tokenizers = {lang: MosesPerlTokenizer(lang).tokenize_line for lang in LANGUAGES}
    tokenized = {key: list(map(tokenizers[key[1]], lines)) for key, lines in texts.items()}
    kept = clean_corpus(tokenized[TRAIN_STEM, SOURCE_LANG], tokenized[TRAIN_STEM, TARGET_LANG])
    logger.info("clean: kept %d of %d training pairs", len(kept), len(tokenized[TRAIN_STEM, "de"]))
    splits, normalized = {}, lambda line: perl_lowercase(perl_normalize_space(line))
    kinds = {"tok": (tokenized, perl_lowercase), "raw": (texts, normalized)}  # test: as it is
    for lang in LANGUAGES:
        for kind, (text, test_line) in kinds.items():  # training pairs as cleaned: normalized
            lines = [normalized(text[TRAIN_STEM, lang][index]) for index, _, _ in kept]
            splits["train", kind, lang] = [x for n, x in enumerate(lines, 1) if n % VALID_EVERY]
            splits["valid", kind, lang] = lines[VALID_EVERY - 1 :: VALID_EVERY]  # awk 'NR%23 == 0'
            test = [test_line(x) for stem in TEST_STEMS for x in text[stem, lang]]
            splits["test", kind, lang] = test
    return splits


def learn_and_apply_bpe(splits: Dict, merges: int) -> str:
    """The codes learned on the tokenized train.de + train.en; adds each (split, "bpe", lang)."""
    learned = io.StringIO()
    train = "".join(line + "\n" for lang in LANGUAGES for line in splits["train", "tok", lang])
    learn_bpe(io.StringIO(train), learned, merges)
    bpe = BPE(io.StringIO(learned.getvalue()))
    for split, kind, lang in [key for key in splits if key[1] == "tok"]:
        splits[split, "bpe", lang] = list(map(bpe.process_line, splits[split, kind, lang]))
    return learned.getvalue()


def data_folder_name(archive: str, bpe_merges: int) -> str:
    """Named by what it holds, so that another archive never lands on trained data."""
    return f"iwslt14-de-en-{file_md5(archive)[:10]}-bpe{bpe_merges}"


def reference_files(data_dir: str) -> Dict[str, str]:
    """{"valid": path, "test": path}: the untokenized target sides, sacreBLEU's references."""
    return {split: os.path.join(data_dir, f"{split}.raw.{TARGET_LANG}") for split in SPLITS[1:]}


def _count_report(counts: Dict[str, int]) -> str:
    return ", ".join(f"{split} {counts[split]:,}" for split in SPLITS)


def prepare_iwslt14(archive: str, data_root: str, bpe_merges: int = DEFAULT_BPE_MERGES) -> str:
    """The recipe from the local `archive` into `<data_root>/<data_folder_name(...)>`, returned
    (at once if it exists); a failure leaves nothing behind."""
    if bpe_merges < 1:
        raise SettingError(f"--bpe-merges: must be positive, not {bpe_merges}")
    if not os.path.isfile(archive):
        raise ExperimentError(f"{archive}: archive not found")
    folder = os.path.join(data_root, data_folder_name(archive, bpe_merges))
    if os.path.isdir(folder):
        logger.info("data: %s is prepared already", folder)
        return folder
    logger.info("data: preparing %s into %s", archive, folder)
    splits = split_corpus(extract_texts(archive))
    counts = {split: len(splits[split, "tok", SOURCE_LANG]) for split in SPLITS}
    logger.info("split: %s pairs", _count_report(counts))
    if counts != REAL_COUNTS and file_md5(archive) == ARCHIVE_MD5:  # the port's own check
        raise ExperimentError(
            f"{archive}: split sizes {_count_report(counts)} differ from prepare-iwslt14.sh's "
            f"{_count_report(REAL_COUNTS)} on this archive"
        )
    os.makedirs(data_root, exist_ok=True)
    building = temporary_name(folder)
    try:
        write_text(os.path.join(building, "code"), learn_and_apply_bpe(splits, bpe_merges))
        for (split, kind, lang), lines in splits.items():
            write_lines(os.path.join(building, f"{split}.{kind}.{lang}"), lines)
        prefixes = {split: os.path.join(building, f"{split}.bpe") for split in SPLITS}
        synthetic_data.fairseq_preprocess(prefixes, os.path.join(building, DATA_BIN))
        try:
            os.rename(building, folder)
        except OSError:  # another process finished the same folder first: theirs is as good
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def parser() -> argparse.ArgumentParser:
    about = "IWSLT'14 de-en as fairseq's prepare-iwslt14.sh into "
    about += "DATA_ROOT/iwslt14-de-en-<archive MD5>-bpe<merges>/; prints its data-bin."
    p = argparse.ArgumentParser(prog=PROGRAM, description=about)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--archive", help="a local de-en.tgz (default: download it)")
    source.add_argument("--sample", action="store_true", help="a generated sample archive")
    p.add_argument("--data-root", default="data", help="(default: %(default)s)")
    p.add_argument("--bpe-merges", type=int, default=DEFAULT_BPE_MERGES, help="(%(default)s)")
    p.add_argument("--download-url", default=DOWNLOAD_URL, help="(%(default)s)")
    md5 = "checked on download (an existing DATA_ROOT/de-en.tgz is used as it is)"
    p.add_argument("--download-md5", default=ARCHIVE_MD5, help=md5)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return run_command(PROGRAM, lambda: _work(args))


def _work(args: argparse.Namespace) -> int:
    md5 = args.download_md5.lower()
    if not re.fullmatch(r"[0-9a-f]{32}", md5):  # a bad flag fails before any work
        raise SettingError(f"--download-md5 must be 32 hexadecimal digits, got {md5!r}")
    archive, root = args.archive, args.data_root
    if args.sample:
        archive = synthetic_data.build_sample_archive(os.path.join(root, SAMPLE_ARCHIVE_NAME))
    elif archive is None:
        archive = download_archive(args.download_url, os.path.join(root, ARCHIVE_NAME), md5)
    print(os.path.join(prepare_iwslt14(archive, root, args.bpe_merges), DATA_BIN))
    return 0
