"""IWSLT'14 German-English as fairseq's `examples/translation/prepare-iwslt14.sh` does, in Python.

From the archive `de-en.tgz` (a local file, or fairseq's mirror over https, MD5 checked) to the
data folder `<data_root>/iwslt14-de-en-<archive MD5, 10 hex>-bpe<merges>/`:
1. read: every member used is checked (present, complete, UTF-8, as many German as English
   lines) before anything is written. Training text: lines with `<url>`, `<talkid>` or
   `<keywords>` dropped, `<title>`, `<description>` tags deleted; dev/test XML: the `<seg>`
   lines without their tags, ’ -> '.
2. tokenize as tokenizer.perl (`-l de` / `-l en`, escaping on; `MosesPerlTokenizer`, on
   `workers` processes), lowercase dev/test; 3. clean-corpus-n.perl `-ratio 1.5 ... 1 175` on
   the training pairs, then lowercase; 4. every 23rd cleaned pair to valid, test = dev2010 +
   TEDX.dev2012 + tst2010-2012 (the real archive: 160,239 / 7,283 / 6,750 pairs, checked);
5. subword-nmt BPE learned on train.de + train.en, applied to every split; 6. fairseq-preprocess.
The folder holds `{split}.tok.{lang}` (4), `code` and `{split}.bpe.{lang}` (5), `data-bin/` (6)
and `{split}.raw.{lang}`, the same pairs untokenized (whitespace-normalized, lowercased): the
references of sacreBLEU. It is built under a temporary name and renamed when complete, so a
folder of that name is a finished preparation of that archive with those settings.
"""

import argparse
import contextlib
import gzip
import hashlib
import http.client
import io
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
import urllib.request
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import regex
from sacremoses import MosesTokenizer
from sacremoses.corpus import NonbreakingPrefixes

from . import synthetic_data
from .cli import run_command
from .errors import ExperimentError, SettingError
from .files import atomic_output, temporary_name, write_lines
from .logs import log_to_stdout
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
DOWNLOAD_RETRY_SECONDS, DOWNLOAD_TIMEOUT_SECONDS = 5.0, 60
READ_BLOCK_BYTES = 1 << 20

ARCHIVE_MEMBERS = [f"{ARCHIVE_FOLDER}/{TRAIN_STEM}.{lang}" for lang in LANGUAGES] + [
    f"{ARCHIVE_FOLDER}/{stem}.{lang}.xml" for stem in TEST_STEMS for lang in LANGUAGES
]
TRAIN_DROPPED_TAGS = ("<url>", "<talkid>", "<keywords>")
TRAIN_DELETED_TAGS = ("<title>", "</title>", "<description>", "</description>")
# sed 's/<seg id="[0-9]*">\s*//g' and 's/\s*<\/seg>\s*//g', with GNU sed's \s in a UTF-8 locale
# (glibc's iswspace: no-break spaces excluded).
SED_SPACE = "[ \t\n\r\f\v\u1680\u2000-\u2006\u2008-\u200a\u2028\u2029\u205f\u3000]"
SEG_OPEN = re.compile(f'<seg id="[0-9]*">{SED_SPACE}*')
SEG_CLOSE = re.compile(f"{SED_SPACE}*</seg>{SED_SPACE}*")
CLEAN_RATIO, CLEAN_MIN_TOKENS, CLEAN_MAX_TOKENS = 1.5, 1, 175
CLEAN_MAX_TOKEN_CHARS = 1000  # clean-corpus-n.perl's default -max-word-length
VALID_EVERY = 23
REAL_COUNTS = {"train": 160239, "valid": 7283, "test": 6750}
REAL_CORPUS_MIN_PAIRS = 100_000  # the samples are tiny: a corpus this large is the real one
CHUNK_LINES = 2000  # lines a tokenizer or BPE process takes at a time

# --- Moses tokenizer.perl, token for token -----------------------------------------------------

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
NONBREAKING, NONBREAKING_BEFORE_NUMBER = 1, 2


class MosesPerlTokenizer(MosesTokenizer):
    """sacremoses' MosesTokenizer made to agree with the current Moses tokenizer.perl, as run by
    prepare-iwslt14.sh (`-l de` or `-l en`, no `-a`, escaping on), on one line at a time.

    Where sacremoses 0.2 differs from the perl script, and what this class does instead:
    - a word ending in a period is split when it is the last word of the line (`u.s.a.` ->
      `u.s.a .`, `t.` -> `t .`), whatever the non-breaking prefixes say; `...` stays whole;
    - the character classes are perl's Unicode properties (Alphabetic, Nd, N, Lowercase, via
      the `regex` module) instead of sacremoses' tables, which miss CJK ideographs, Georgian
      lowercase letters and many numbers, and add Indic viramas to the letters;
    - whitespace is perl's: the separators \\x1c-\\x1f are deleted as control characters rather
      than turned into spaces, and spaces left by deleted control characters are merged;
    - the word loop is perl's own (its `split(/\\s/)`, its prefix table where a later line
      wins), which the last-word rule needs; on the de/en prefix lists it otherwise agrees;
    - a line of whitespace only is returned unchanged, as perl prints it.
    """

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
        if lang not in LANGUAGES:
            raise ValueError(
                f"MosesPerlTokenizer reproduces tokenizer.perl for {LANGUAGES}, not {lang!r}"
            )
        super().__init__(lang=lang)
        self.prefix_kinds: Dict[str, int] = {}
        for item in NonbreakingPrefixes().words(lang):
            if not item or item.startswith("#"):
                continue
            numeric_only = NUMERIC_ONLY_PREFIX.search(item)
            if numeric_only:
                self.prefix_kinds[numeric_only.group(1)] = NONBREAKING_BEFORE_NUMBER
            else:
                self.prefix_kinds[item] = NONBREAKING

    def handles_nonbreaking_prefixes(self, text: str) -> str:
        words = text.split(" ")
        while words and not words[-1]:  # perl's split drops trailing empty fields only
            words.pop()
        last = len(words) - 1
        for i, word in enumerate(words):
            if len(word) < 2 or not word.endswith("."):
                continue
            prefix, next_word = word[:-1], words[i + 1] if i < last else ""
            kind = self.prefix_kinds.get(prefix)
            kept = i < last and (  # the last word always loses its period
                ("." in prefix and HAS_ALPHA.search(prefix))
                or kind == NONBREAKING
                or STARTS_LOWER.match(next_word)
                or (kind == NONBREAKING_BEFORE_NUMBER and STARTS_ASCII_DIGIT.match(next_word))
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


_TOOLS: Dict[Tuple[str, str], Callable[[str], str]] = {}  # per process: tokenizers, BPE codes


def _apply_tool(job: Tuple[str, str, str]) -> str:
    """Pool worker: ("moses", lang, line) tokenizes a line, ("bpe", codes file, line) splits it."""
    from subword_nmt.apply_bpe import BPE

    tool, argument, line = job
    if (tool, argument) not in _TOOLS:
        if tool == "moses":
            _TOOLS[tool, argument] = MosesPerlTokenizer(argument).tokenize_line
        else:
            with open(argument, encoding="utf-8") as codes:
                _TOOLS[tool, argument] = BPE(codes).process_line
    return _TOOLS[tool, argument](line)


def _apply_to_texts(tool: str, texts: Dict, argument: Callable, workers: int) -> Dict:
    """{key: `_apply_tool` on each line of texts[key] with `argument(key)`}, on `workers`."""
    jobs = [(tool, argument(key), line) for key, lines in texts.items() for line in lines]
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = iter(pool.map(_apply_tool, jobs, CHUNK_LINES) if pool else map(_apply_tool, jobs))
        return {key: [next(results) for _ in lines] for key, lines in texts.items()}


# --- The archive --------------------------------------------------------------------------------


def split_lines(text: str) -> List[str]:
    """Lines as grep, sed and perl see them: split at \\n only, no empty line after a final \\n."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8", newline="\n") as text:
        return split_lines(text.read())


def read_archive(archive: str) -> Dict[str, List[str]]:
    """The lines of every member of ARCHIVE_MEMBERS, reading the whole archive so that a
    truncated or corrupt one fails here, with an `ExperimentError` naming the archive."""
    contents = {}
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            with tarfile.open(fileobj=unzipped, mode="r|") as tar:
                for member in tar:
                    if os.path.normpath(member.name) in ARCHIVE_MEMBERS and member.isfile():
                        contents[os.path.normpath(member.name)] = tar.extractfile(member).read()
            while unzipped.read(READ_BLOCK_BYTES):  # to the end: checks the gzip CRC
                pass
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ExperimentError(f"{archive}: corrupt or truncated archive ({exc})") from None
    for name in ARCHIVE_MEMBERS:
        if name not in contents:
            raise ExperimentError(f"{archive}: missing member {name}")
        try:
            contents[name] = split_lines(contents[name].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ExperimentError(f"{archive}: member {name} is not UTF-8 ({exc})") from None
    return contents


def training_text(lines: Sequence[str]) -> List[str]:
    """grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>' | sed -e 's/<title>//g' ..."""
    kept = [line for line in lines if not any(tag in line for tag in TRAIN_DROPPED_TAGS)]
    for tag in TRAIN_DELETED_TAGS:
        kept = [line.replace(tag, "") for line in kept]
    return kept


def segment_text(lines: Sequence[str]) -> List[str]:
    """grep '<seg id' | sed (seg tags removed) | sed "s/’/'/g"."""
    segments = [line for line in lines if "<seg id" in line]
    return [SEG_CLOSE.sub("", SEG_OPEN.sub("", x)).replace("\u2019", "'") for x in segments]


def extract_texts(archive: str) -> Dict[Tuple[str, str], List[str]]:
    """The text the recipe tokenizes, keyed (name, language) with name `TRAIN_STEM` or one of
    `TEST_STEMS`; German and English must have the same number of lines in each."""
    members, texts = read_archive(archive), {}
    for stem in (TRAIN_STEM,) + TEST_STEMS:
        suffix, extract = (".xml", segment_text) if stem in TEST_STEMS else ("", training_text)
        files = [f"{ARCHIVE_FOLDER}/{stem}.{lang}{suffix}" for lang in LANGUAGES]
        de, en = texts[stem, "de"], texts[stem, "en"] = [extract(members[f]) for f in files]
        if len(de) != len(en):
            raise ExperimentError(
                f"{archive}: {files[0]} has {len(de)} text lines but {files[1]} has {len(en)}"
            )
    return texts


def file_md5(path: str) -> str:
    with open(path, "rb") as data:
        return hashlib.file_digest(data, "md5").hexdigest()


def check_md5_option(md5: Optional[str]) -> Optional[str]:
    """--download-md5: 32 hexadecimal digits (lowercased), or None for no check."""
    if md5 is not None and not re.fullmatch(r"[0-9a-f]{32}", md5.lower()):
        raise SettingError(f"--download-md5 must be 32 hexadecimal digits, got {md5!r}")
    return md5 and md5.lower()


def _check_md5(path: str, expected: Optional[str], allow_mismatch: bool, what: str, fix: str):
    digest = file_md5(path)
    if expected is not None and digest != expected:
        message = f"{what}: MD5 {digest} differs from the expected {expected}"
        if not allow_mismatch:
            raise ExperimentError(f"{message}; {fix}, or pass --allow-md5-mismatch")
        logger.warning("%s (--allow-md5-mismatch: used anyway)", message)


def download_archive(
    url: str, destination: str, *, md5=ARCHIVE_MD5, allow_md5_mismatch=False, attempts=5
) -> str:
    """Downloads `url` to `destination` (which appears only when whole and verified), a failed
    attempt starting again from the first byte, and checks the size the server announced and
    the MD5 (`md5`; None: no check). An archive already at `destination` is verified and used.
    A wrong MD5 is an error unless `allow_md5_mismatch`."""
    md5 = check_md5_option(md5)
    if os.path.exists(destination):
        what, fix = f"archive already present: {destination}", "delete it to download it again"
        _check_md5(destination, md5, allow_md5_mismatch, what, fix)
        return destination
    for attempt in range(1, attempts + 1):
        try:
            with atomic_output(destination) as temporary:
                _download(url, temporary)
                fix = "removed; --download-md5 for another mirror's"
                _check_md5(temporary, md5, allow_md5_mismatch, f"downloaded from {url}", fix)
            return destination
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
            logger.warning(
                "download of %s failed (attempt %d of %d): %s", url, attempt, attempts, exc
            )
            if attempt == attempts:
                raise ExperimentError(
                    f"{url}: download failed {attempts} times ({exc}); pass a local --archive"
                ) from None
            time.sleep(DOWNLOAD_RETRY_SECONDS * attempt)


def _download(url: str, path: str) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
        total = int(response.headers.get("Content-Length", -1))
        with open(path, "wb") as out:
            shutil.copyfileobj(response, out, READ_BLOCK_BYTES)
            have = out.tell()
    if total >= 0 and have != total:
        raise ValueError(f"got {have} of {total} bytes")


# --- Cleaning, splitting, BPE, binarizing -------------------------------------------------------


def clean_corpus(src_lines: Sequence[str], tgt_lines: Sequence[str]) -> List[Tuple[int, str, str]]:
    """clean-corpus-n.perl -ratio 1.5 ... 1 175: the kept pairs as (index, source, target),
    whitespace-normalized. A pair is dropped when a side has fewer than 1 or more than 175
    words, a token longer than 1000 characters, or more than 1.5 times the words of the other.
    (Its rule for the factor separator | never applies: the tokenizer escapes | as &#124;.)"""
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


def split_corpus(texts: Dict, workers: int) -> Dict[Tuple[str, str, str], List[str]]:
    """Steps 2-4 on `extract_texts`' output: {(split, "tok" or "raw", lang): lines}."""
    tokenized = _apply_to_texts("moses", texts, lambda key: key[1], workers)
    kept = clean_corpus(tokenized[TRAIN_STEM, SOURCE_LANG], tokenized[TRAIN_STEM, TARGET_LANG])
    logger.info("clean: kept %d of %d training pairs", len(kept), len(tokenized[TRAIN_STEM, "de"]))
    splits, untokenized = {}, lambda line: perl_lowercase(perl_normalize_space(line))
    for side, lang in ((1, SOURCE_LANG), (2, TARGET_LANG)):
        train = {
            "tok": [perl_lowercase(pair[side]) for pair in kept],
            "raw": [untokenized(texts[TRAIN_STEM, lang][pair[0]]) for pair in kept],
        }
        test = {
            "tok": [perl_lowercase(x) for stem in TEST_STEMS for x in tokenized[stem, lang]],
            "raw": [untokenized(x) for stem in TEST_STEMS for x in texts[stem, lang]],
        }
        for kind, lines in train.items():  # awk 'NR%23 == 0' goes to valid
            splits["train", kind, lang] = [x for n, x in enumerate(lines, 1) if n % VALID_EVERY]
            splits["valid", kind, lang] = lines[VALID_EVERY - 1 :: VALID_EVERY]
            splits["test", kind, lang] = test[kind]
    return splits


def learn_and_apply_bpe(folder: str, merges: int, workers: int) -> None:
    """Step 5: `folder/code` learned on train.tok.de + train.tok.en, `{split}.bpe.{lang}`."""
    from subword_nmt.learn_bpe import learn_bpe

    pairs = [(split, lang) for split in SPLITS for lang in LANGUAGES]
    texts = {key: read_lines(os.path.join(folder, "{}.tok.{}".format(*key))) for key in pairs}
    learned, codes = io.StringIO(), os.path.join(folder, "code")
    train = "".join(line + "\n" for lang in LANGUAGES for line in texts["train", lang])
    learn_bpe(io.StringIO(train), learned, merges)
    write_lines(codes, split_lines(learned.getvalue()))
    for (split, lang), lines in _apply_to_texts("bpe", texts, lambda _: codes, workers).items():
        write_lines(os.path.join(folder, f"{split}.bpe.{lang}"), lines)


# --- The data folder ----------------------------------------------------------------------------


def data_folder_name(archive: str, bpe_merges: int, joined_dictionary: bool = False) -> str:
    """`iwslt14-de-en-<first 10 hex of the archive's MD5>-bpe<merges>` (+ `-joined`: one
    dictionary): named by what it holds, so that another archive never lands on trained data."""
    joined = "-joined" if joined_dictionary else ""
    return f"iwslt14-de-en-{file_md5(archive)[:10]}-bpe{bpe_merges}{joined}"


def reference_files(data_dir: str) -> Dict[str, str]:
    """{"valid": path, "test": path}: the untokenized target sides, sacreBLEU's references."""
    return {split: os.path.join(data_dir, f"{split}.raw.{TARGET_LANG}") for split in SPLITS[1:]}


def _count_report(counts: Dict[str, int]) -> str:
    return ", ".join(f"{split} {counts[split]:,}" for split in SPLITS)


def prepare_iwslt14(
    archive: str,
    data_root: str,
    bpe_merges: int = DEFAULT_BPE_MERGES,
    workers: int = 1,
    expect_real_counts: Optional[bool] = None,
    joined_dictionary: bool = False,
) -> str:
    """The recipe of the module docstring from the local `archive` into
    `<data_root>/<data_folder_name(...)>`, returned (at once if it exists). `expect_real_counts`:
    check the real corpus's split sizes (None: if the training text has >= 100,000 pairs).
    Raises `ExperimentError` for an unusable archive or flag; a failure leaves nothing behind."""
    if bpe_merges < 1:
        raise SettingError(f"--bpe-merges: must be positive, not {bpe_merges}")
    if not os.path.isfile(archive):
        raise ExperimentError(f"{archive}: archive not found")
    folder = os.path.join(data_root, data_folder_name(archive, bpe_merges, joined_dictionary))
    workers = max(1, workers)
    if os.path.isdir(folder):
        logger.info("data: %s is prepared already", folder)
        return folder
    logger.info("data: preparing %s into %s on %d processes", archive, folder, workers)
    splits = split_corpus(extract_texts(archive), workers)
    counts = {split: len(splits[split, "tok", SOURCE_LANG]) for split in SPLITS}
    logger.info("split: %s pairs", _count_report(counts))
    if expect_real_counts is None:
        expect_real_counts = counts["train"] + counts["valid"] >= REAL_CORPUS_MIN_PAIRS
    if expect_real_counts and counts != REAL_COUNTS:
        raise ExperimentError(
            f"{archive}: split sizes {_count_report(counts)} differ from the real IWSLT'14 "
            f"{_count_report(REAL_COUNTS)} (--no-expect-real-counts for another corpus)"
        )
    os.makedirs(data_root, exist_ok=True)
    building = temporary_name(folder)
    try:
        for (split, kind, lang), lines in splits.items():
            write_lines(os.path.join(building, f"{split}.{kind}.{lang}"), lines)
        learn_and_apply_bpe(building, bpe_merges, workers)
        prefixes = {split: os.path.join(building, f"{split}.bpe") for split in SPLITS}
        dest = os.path.join(building, DATA_BIN)
        synthetic_data.fairseq_preprocess(prefixes, dest, joined=joined_dictionary, workers=workers)
        try:
            os.rename(building, folder)
        except OSError:  # another process finished the same folder first: theirs is as good
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


# --- fairseq-asam-prepare -----------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        description="IWSLT'14 German-English for fairseq as examples/translation/prepare-iwslt14"
        ".sh, into DATA_ROOT/iwslt14-de-en-<archive MD5>-bpe<merges>/ (its {valid,test}.raw.en: "
        "the references for sacreBLEU); prints its data-bin.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--archive", help="a local de-en.tgz (default: download it)")
    source.add_argument("--sample", action="store_true", help="a generated sample archive")
    p.add_argument("--data-root", default="data", help="(default: %(default)s)")
    p.add_argument("--bpe-merges", type=int, default=DEFAULT_BPE_MERGES, help="(%(default)s)")
    p.add_argument("--joined-dictionary", action="store_true", help="one dictionary for both")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="(%(default)s)")
    p.add_argument(
        "--expect-real-counts",
        action=argparse.BooleanOptionalAction,
        help="check the real corpus's 160,239 / 7,283 / 6,750 pairs (default: for corpora "
        f"of at least {REAL_CORPUS_MIN_PAIRS:,} cleaned training pairs)",
    )
    p.add_argument("--download-url", default=DOWNLOAD_URL, help="(%(default)s)")
    p.add_argument("--download-md5", default=ARCHIVE_MD5, help="of DATA_ROOT/de-en.tgz")
    p.add_argument(
        "--allow-md5-mismatch",
        action="store_true",
        help="use an archive of another MD5 (a warning; the line counts still check the corpus)",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    log_to_stdout()
    return run_command(PROGRAM, lambda: _work(args))


def _work(args: argparse.Namespace) -> int:
    md5 = check_md5_option(args.download_md5)  # a bad flag fails before any work
    archive = args.archive
    if args.sample:
        archive = synthetic_data.build_sample_archive(
            os.path.join(args.data_root, SAMPLE_ARCHIVE_NAME)
        )
    elif archive is None:
        destination, allow = os.path.join(args.data_root, ARCHIVE_NAME), args.allow_md5_mismatch
        archive = download_archive(
            args.download_url, destination, md5=md5, allow_md5_mismatch=allow
        )
    settings = (args.bpe_merges, args.workers, args.expect_real_counts, args.joined_dictionary)
    folder = prepare_iwslt14(archive, args.data_root, *settings)
    print(os.path.join(folder, DATA_BIN))
    return 0
