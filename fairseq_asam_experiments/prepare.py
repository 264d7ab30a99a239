"""IWSLT'14 German-English as fairseq's `examples/translation/prepare-iwslt14.sh` does, in Python.

The recipe, step by step (file names relative to `workdir`):

1. archive: `orig/de-en.tgz`, downloaded from fairseq's mirror (https, MD5 checked) unless a
   local archive is given.
   Every member the recipe reads is checked (present, complete, UTF-8, as many German as
   English lines) before anything is written.
2. tokenize -> `iwslt14.tokenized.de-en/tmp/`
   - training text `de-en/train.tags.de-en.{de,en}`: lines holding `<url>`, `<talkid>` or
     `<keywords>` are dropped, the tags `<title>`, `</title>`, `<description>`, `</description>`
     are deleted, the rest is Moses-tokenized (`train.tags.de-en.tok.{de,en}`, the text before
     tokenization is kept as `train.tags.de-en.raw.{de,en}`);
   - dev/test text `de-en/IWSLT14.TED*.{de,en}.xml`: only `<seg id=...>` lines, without the seg
     tags, with ’ turned into ', Moses-tokenized and lowercased (`IWSLT14.*.de-en.{de,en}`,
     before tokenization `IWSLT14.*.de-en.raw.{de,en}`).
   Tokenization is tokenizer.perl's (`-l de` / `-l en`, XML escaping on), reproduced by
   `MosesPerlTokenizer`; it runs on `workers` processes.
3. clean: clean-corpus-n.perl `-ratio 1.5 ... 1 175` on the tokenized training pairs
   (`train.tags.de-en.clean.*`), then lowercase.perl (`train.tags.de-en.{de,en}`).
4. split: every 23rd cleaned training pair is validation, the others training; test is
   dev2010 + TEDX.dev2012 + tst2010 + tst2011 + tst2012 in that order (`{train,valid,test}.*`).
   The real archive gives 160,239 / 7,283 / 6,750 pairs, which is checked.
   The same pairs are also written untokenized (whitespace-normalized and lowercased, ’ still
   turned into ' in dev/test) as `{train,valid,test}.raw.*`: the references of detokenized BLEU.
5. BPE -> `iwslt14.tokenized.de-en/{train,valid,test}.{de,en}`: subword-nmt learn_bpe with
   `bpe_merges` merges (10,000) on train.de followed by train.en, written to `code`, and
   apply_bpe on every split.
6. binarize: fairseq-preprocess into `data-bin/iwslt14.tokenized.de-en` (separate dictionaries,
   or `--joined-dictionary`).

Every step writes each file under a temporary name and renames it when complete
(`files.atomic_output`), then records its settings in `.prepare-iwslt14/<step>.json`. A re-run
skips a step whose record
matches and whose files all exist, and redoes it otherwise; each step's settings include those
of the steps before it, so a changed setting redoes every step from the first it affects.
"""

import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex
from sacremoses import MosesTokenizer
from sacremoses.corpus import NonbreakingPrefixes

from .errors import ExperimentError, SettingError
from .files import atomic_output, write_lines

logger = logging.getLogger(__name__)

SOURCE_LANG, TARGET_LANG = "de", "en"
LANGUAGES = (SOURCE_LANG, TARGET_LANG)
SPLITS = ("train", "valid", "test")

# fairseq's current mirror of the WIT3 archive (the original wit3.fbk.eu link is gone), over
# https (the mirror serves it; fairseq's own READMEs link dl.fbaipublicfiles.com with https).
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
ARCHIVE_NAME = "de-en.tgz"
# MD5 of the mirror's de-en.tgz as published with other preparation scripts.  A downloaded or
# already present archive with another MD5 is an error unless allow_md5_mismatch (the CLI's
# --allow-md5-mismatch) is given; the line counts of step 4 check the corpus either way.
ARCHIVE_MD5 = "10936dfdf616504ddbd844e91b94ef4a"
MD5_PATTERN = re.compile(r"^[0-9a-f]{32}$")
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_RETRY_SECONDS = 5.0
READ_BLOCK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_SECONDS = 60

ARCHIVE_FOLDER = "de-en"
TRAIN_STEM = "train.tags.de-en"
# The five dev/test sets, in the order they are concatenated into the test split.
TEST_STEMS = (
    "IWSLT14.TED.dev2010.de-en",
    "IWSLT14.TEDX.dev2012.de-en",
    "IWSLT14.TED.tst2010.de-en",
    "IWSLT14.TED.tst2011.de-en",
    "IWSLT14.TED.tst2012.de-en",
)
TRAIN_DROPPED_TAGS = ("<url>", "<talkid>", "<keywords>")
TRAIN_DELETED_TAGS = ("<title>", "</title>", "<description>", "</description>")
SEG_MARKER = "<seg id"
# sed 's/<seg id="[0-9]*">\s*//g' and 's/\s*<\/seg>\s*//g', with GNU sed's \s in a UTF-8 locale
# (glibc's iswspace: no-break spaces excluded).
SED_SPACE = "[ \t\n\r\f\v\u1680\u2000-\u2006\u2008-\u200a\u2028\u2029\u205f\u3000]"
SEG_OPEN = re.compile(f'<seg id="[0-9]*">{SED_SPACE}*')
SEG_CLOSE = re.compile(f"{SED_SPACE}*</seg>{SED_SPACE}*")
RIGHT_SINGLE_QUOTE = "\u2019"

CLEAN_RATIO = 1.5
CLEAN_MIN_TOKENS = 1
CLEAN_MAX_TOKENS = 175
CLEAN_MAX_TOKEN_CHARS = 1000  # clean-corpus-n.perl's default -max-word-length
VALID_EVERY = 23

REAL_COUNTS = {"train": 160239, "valid": 7283, "test": 6750}
# The sample archives are tiny; a corpus this large in this layout is taken to be the real one.
REAL_CORPUS_MIN_PAIRS = 100_000

DEFAULT_BPE_MERGES = 10000
TOKENIZE_CHUNK_LINES = 2000
SUBWORD_CHUNK_LINES = 5000

PREP_NAME = "iwslt14.tokenized.de-en"
STATE_FOLDER = ".prepare-iwslt14"


# --------------------------------------------------------------------------------------------
# Moses tokenizer.perl, token for token
# --------------------------------------------------------------------------------------------

# Perl's \s on character strings; Python's \s also matches \x1c-\x1f, which perl deletes as junk.
PERL_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
PERL_SPACE_RUN = regex.compile(f"[{PERL_SPACE}]+")
PERL_BLANK_LINE = regex.compile(f"[{PERL_SPACE}]*")
ASCII_CONTROL = regex.compile(r"[\x00-\x1f]")
# Perl's \p{IsAlnum}, \p{IsAlpha}, \p{IsLower}, \p{IsN} (XPosixAlnum = Alphabetic + Nd, ...).
IS_ALNUM = r"\p{Alphabetic}\p{Nd}"
IS_ALPHA = r"\p{Alphabetic}"
IS_N = r"\p{N}"
HAS_ALPHA = regex.compile(f"[{IS_ALPHA}]")
STARTS_LOWER = regex.compile(r"\p{Lowercase}")
STARTS_ASCII_DIGIT = regex.compile(r"[0-9]")
NUMERIC_ONLY_PREFIX = regex.compile(r"(.*)[" + PERL_SPACE + r"]+#NUMERIC_ONLY#")
NONBREAKING = 1
NONBREAKING_BEFORE_NUMBER = 2


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
            prefix = word[:-1]
            next_word = words[i + 1] if i < last else ""
            kind = self.prefix_kinds.get(prefix)
            if i == last:
                words[i] = prefix + " ."
            elif (
                ("." in prefix and HAS_ALPHA.search(prefix))
                or kind == NONBREAKING
                or STARTS_LOWER.match(next_word)
            ):
                continue
            elif kind == NONBREAKING_BEFORE_NUMBER and STARTS_ASCII_DIGIT.match(next_word):
                continue
            else:
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


_TOKENIZERS: Dict[str, MosesPerlTokenizer] = {}


def _tokenize_chunk(job: Tuple[str, bool, List[str]]) -> List[str]:
    """Pool worker: tokenize (and optionally lowercase) a chunk of lines of one language."""
    lang, lowercase, lines = job
    if lang not in _TOKENIZERS:
        _TOKENIZERS[lang] = MosesPerlTokenizer(lang)
    tokenized = [_TOKENIZERS[lang].tokenize_line(line) for line in lines]
    return [perl_lowercase(line) for line in tokenized] if lowercase else tokenized


_BPE_BY_CODES: Dict[str, object] = {}


def _apply_bpe_chunk(job: Tuple[str, List[str]]) -> List[str]:
    """Pool worker: subword-nmt apply_bpe with the codes file `job[0]` on a chunk of lines."""
    from subword_nmt.apply_bpe import BPE

    codes_path, lines = job
    if codes_path not in _BPE_BY_CODES:
        with open(codes_path, encoding="utf-8") as codes:
            _BPE_BY_CODES[codes_path] = BPE(codes)
    bpe = _BPE_BY_CODES[codes_path]
    return [bpe.process_line(line) for line in lines]


def _map_chunks(function, jobs: Sequence, workers: int) -> List[List[str]]:
    """`function` over `jobs` on up to `workers` processes, results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        return [function(job) for job in jobs]
    with multiprocessing.Pool(min(workers, len(jobs))) as pool:
        return pool.map(function, jobs, chunksize=1)


def _chunked(lines: Sequence[str], size: int) -> List[Sequence[str]]:
    return [lines[start : start + size] for start in range(0, len(lines), size)]


def tokenize_texts(
    texts: Dict[Tuple[str, str], List[str]], *, lowercase: Dict[str, bool], workers: int
) -> Dict[Tuple[str, str], List[str]]:
    """Moses-tokenizes every text, keyed (name, language); `lowercase[name]` adds lowercase.perl."""
    jobs, owners = [], []
    for (name, lang), lines in texts.items():
        for chunk in _chunked(lines, TOKENIZE_CHUNK_LINES):
            jobs.append((lang, lowercase[name], list(chunk)))
            owners.append((name, lang))
    tokenized: Dict[Tuple[str, str], List[str]] = {key: [] for key in texts}
    for owner, lines in zip(owners, _map_chunks(_tokenize_chunk, jobs, workers)):
        tokenized[owner].extend(lines)
    return tokenized


# --------------------------------------------------------------------------------------------
# The archive
# --------------------------------------------------------------------------------------------


def archive_members() -> List[str]:
    """The member files the recipe reads, as paths inside the archive."""
    names = [f"{TRAIN_STEM}.{lang}" for lang in LANGUAGES]
    names += [f"{stem}.{lang}.xml" for stem in TEST_STEMS for lang in LANGUAGES]
    return [f"{ARCHIVE_FOLDER}/{name}" for name in names]


def split_lines(text: str) -> List[str]:
    """Lines as grep, sed and perl see them: split at \\n only, no empty line after a final \\n."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_archive(archive: str) -> Dict[str, List[str]]:
    """The lines of every member of `archive_members()`, reading the whole archive so that a
    truncated or corrupt one fails here, with an `ExperimentError` naming the archive."""
    wanted = set(archive_members())
    contents: Dict[str, bytes] = {}
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            with tarfile.open(fileobj=unzipped, mode="r|") as tar:
                for member in tar:
                    name = os.path.normpath(member.name)
                    if name in wanted and member.isfile():
                        contents[name] = tar.extractfile(member).read()
            while unzipped.read(READ_BLOCK_BYTES):  # to the end: checks the gzip CRC
                pass
    except FileNotFoundError:
        raise ExperimentError(f"{archive}: archive not found") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ExperimentError(f"{archive}: corrupt or truncated archive ({exc})") from None
    missing = [name for name in archive_members() if name not in contents]
    if missing:
        raise ExperimentError(f"{archive}: missing member {missing[0]}")
    lines = {}
    for name, data in contents.items():
        try:
            lines[name] = split_lines(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ExperimentError(
                f"{archive}: member {name} is not UTF-8 (byte {exc.start})"
            ) from None
    return lines


def training_text(lines: Iterable[str]) -> List[str]:
    """grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>' | sed -e 's/<title>//g' ..."""
    kept = []
    for line in lines:
        if any(tag in line for tag in TRAIN_DROPPED_TAGS):
            continue
        for tag in TRAIN_DELETED_TAGS:
            line = line.replace(tag, "")
        kept.append(line)
    return kept


def segment_text(lines: Iterable[str]) -> List[str]:
    """grep '<seg id' | sed (seg tags removed) | sed "s/’/'/g"."""
    return [
        SEG_CLOSE.sub("", SEG_OPEN.sub("", line)).replace(RIGHT_SINGLE_QUOTE, "'")
        for line in lines
        if SEG_MARKER in line
    ]


def extract_texts(archive: str) -> Dict[Tuple[str, str], List[str]]:
    """The text the recipe tokenizes, keyed (name, language) with name `TRAIN_STEM` or one of
    `TEST_STEMS`; German and English must have the same number of lines in each."""
    members = read_archive(archive)
    texts: Dict[Tuple[str, str], List[str]] = {}
    for lang in LANGUAGES:
        texts[TRAIN_STEM, lang] = training_text(members[f"{ARCHIVE_FOLDER}/{TRAIN_STEM}.{lang}"])
        for stem in TEST_STEMS:
            texts[stem, lang] = segment_text(members[f"{ARCHIVE_FOLDER}/{stem}.{lang}.xml"])
    for stem in (TRAIN_STEM,) + TEST_STEMS:
        counts = {lang: len(texts[stem, lang]) for lang in LANGUAGES}
        if counts[SOURCE_LANG] != counts[TARGET_LANG]:
            suffix = "" if stem == TRAIN_STEM else ".xml"
            raise ExperimentError(
                f"{archive}: {ARCHIVE_FOLDER}/{stem}.{SOURCE_LANG}{suffix} has "
                f"{counts[SOURCE_LANG]} text lines but "
                f"{ARCHIVE_FOLDER}/{stem}.{TARGET_LANG}{suffix} has {counts[TARGET_LANG]}"
            )
    return texts


def check_md5_option(md5: Optional[str]) -> Optional[str]:
    """--download-md5: 32 hexadecimal digits (lowercased), or None for no check."""
    if md5 is None:
        return None
    if not MD5_PATTERN.match(md5.lower()):
        raise SettingError(f"--download-md5 must be 32 hexadecimal digits, got {md5!r}")
    return md5.lower()


def verify_md5(
    path: str, expected: Optional[str], allow_mismatch: bool, what: str
) -> Optional[str]:
    """The MD5 of `path`; raises if it is not `expected` (unless `allow_mismatch`: a warning)."""
    digest = _md5(path)
    if expected is None or digest == expected:
        return digest
    message = f"{what} {path}: MD5 {digest} differs from the expected {expected}"
    if allow_mismatch:
        logger.warning("%s (--allow-md5-mismatch: used anyway)", message)
        return digest
    raise ExperimentError(message)


def download_archive(
    url: str,
    destination: str,
    *,
    md5: Optional[str] = ARCHIVE_MD5,
    allow_md5_mismatch: bool = False,
    attempts: int = DOWNLOAD_ATTEMPTS,
) -> str:
    """Downloads `url` to `destination`, each failed attempt starting again from the first
    byte, and checks the size the server announced and the MD5 (`md5`; None: no check).  The
    file appears under its name only when whole and verified.  An archive already at
    `destination` (a local file put there) is verified and used.  A wrong MD5 is an error
    unless `allow_md5_mismatch`."""
    md5 = check_md5_option(md5)
    if os.path.exists(destination):
        try:
            verify_md5(destination, md5, allow_md5_mismatch, "archive already present:")
        except ExperimentError as error:
            raise ExperimentError(
                f"{error}; delete it to download it again, or pass --allow-md5-mismatch"
            ) from None
        logger.info("using %s (already downloaded, MD5 checked)", destination)
        return destination
    for attempt in range(1, attempts + 1):
        try:
            with atomic_output(destination) as temporary:
                _download(url, temporary)
                digest = verify_md5(temporary, md5, allow_md5_mismatch, f"downloaded from {url}:")
            break
        except ExperimentError as error:  # the MD5: the file is removed
            raise ExperimentError(
                f"{error} (removed; pass --allow-md5-mismatch to use such a file, or "
                "--download-md5 for another mirror's)"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            logger.warning(
                "download of %s failed (attempt %d of %d): %s", url, attempt, attempts, exc
            )
            if attempt == attempts:
                raise ExperimentError(
                    f"{url}: download failed {attempts} times ({exc}); pass a local --archive"
                ) from None
            time.sleep(DOWNLOAD_RETRY_SECONDS * attempt)
    size = os.path.getsize(destination)
    logger.info("downloaded %s to %s (%d bytes, MD5 %s)", url, destination, size, digest)
    return destination


def _download(url: str, path: str) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
        total = int(response.headers.get("Content-Length", -1))
        with open(path, "wb") as out:
            shutil.copyfileobj(response, out, READ_BLOCK_BYTES)
            have = out.tell()
    if total >= 0 and have != total:
        raise ValueError(f"got {have} of {total} bytes")


def _md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(READ_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Cleaning and splitting
# --------------------------------------------------------------------------------------------


def perl_normalize_space(line: str) -> str:
    """s/\\s+/ /g; s/^ //; s/ $// with perl's \\s."""
    return PERL_SPACE_RUN.sub(" ", line).strip(" ")


def clean_corpus(
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    *,
    ratio: float = CLEAN_RATIO,
    min_tokens: int = CLEAN_MIN_TOKENS,
    max_tokens: int = CLEAN_MAX_TOKENS,
) -> List[Tuple[int, str, str]]:
    """clean-corpus-n.perl -ratio `ratio` ... `min_tokens` `max_tokens`: the kept pairs as
    (index, source, target), whitespace-normalized. A pair is dropped when a side is empty, has
    fewer than `min_tokens` or more than `max_tokens` words, a token longer than 1000
    characters, or when one side has more than `ratio` times the words of the other. (Its rule
    for the factor separator | never applies: the tokenizer escapes | as &#124;.)"""
    kept = []
    for index, (src, tgt) in enumerate(zip(src_lines, tgt_lines)):
        src, tgt = perl_normalize_space(src), perl_normalize_space(tgt)
        if not src or not tgt:
            continue
        src_words, tgt_words = src.split(" "), tgt.split(" ")
        if not all(min_tokens <= len(words) <= max_tokens for words in (src_words, tgt_words)):
            continue
        if len(tgt_words) / len(src_words) > ratio or len(src_words) / len(tgt_words) > ratio:
            continue
        if max(map(len, src_words + tgt_words)) > CLEAN_MAX_TOKEN_CHARS:
            continue
        kept.append((index, src, tgt))
    return kept


def is_valid_line(line_number: int) -> bool:
    """awk 'NR%23 == 0': the 1-based `line_number` of the cleaned training text goes to valid."""
    return line_number % VALID_EVERY == 0


# --------------------------------------------------------------------------------------------
# Files and steps
# --------------------------------------------------------------------------------------------


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8", newline="\n") as text:
        return split_lines(text.read())


class _StepRecords:
    """`.prepare-iwslt14/<step>.json` holds the settings a finished step ran with."""

    def __init__(self, workdir: str):
        self.folder = os.path.join(workdir, STATE_FOLDER)

    def is_done(self, step: str, settings: dict, outputs: Sequence[str]) -> bool:
        record = os.path.join(self.folder, f"{step}.json")
        if not (os.path.exists(record) and all(os.path.exists(path) for path in outputs)):
            return False
        with open(record, encoding="utf-8") as recorded:
            return json.load(recorded) == settings

    def mark_done(self, step: str, settings: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        write_lines(
            os.path.join(self.folder, f"{step}.json"), [json.dumps(settings, sort_keys=True)]
        )


def prepared_settings(workdir: str) -> Optional[dict]:
    """The settings the last finished preparation in `workdir` ran with (archive, its size and
    time, subword, bpe_merges, ...), None if none finished there."""
    path = os.path.join(workdir, STATE_FOLDER, "binarize.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return settings if isinstance(settings, dict) else None


def _count_report(counts: Dict[str, int]) -> str:
    return ", ".join(f"{split} {counts[split]:,}" for split in SPLITS)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def prepare_iwslt14(
    archive: Optional[str],
    workdir: str,
    *,
    bpe_merges: int = DEFAULT_BPE_MERGES,
    joined_dictionary: bool = False,
    workers: int = os.cpu_count() or 1,
    expect_real_counts: Optional[bool] = None,
    download_url: str = DOWNLOAD_URL,
    download_md5: Optional[str] = ARCHIVE_MD5,
    allow_md5_mismatch: bool = False,
) -> str:
    """Runs the recipe of the module docstring; returns `workdir/data-bin/iwslt14.tokenized.de-en`.

    `archive`: a local `de-en.tgz`, or None to download `download_url` to `workdir/orig/`
    (checked against `download_md5` unless `allow_md5_mismatch`, see download_archive).
    `bpe_merges`: the number of BPE merges. `joined_dictionary`: one fairseq dictionary for both
    languages. `workers`: processes for tokenization, apply_bpe and fairseq-preprocess.
    `expect_real_counts`: check the split sizes against the real corpus's 160,239 / 7,283 /
    6,750; None checks them when the cleaned training text has at least 100,000 pairs.
    Raises `ExperimentError` for an unusable archive or flag, before writing the step's files.
    """
    if bpe_merges < 1:
        raise SettingError(f"--bpe-merges: must be positive, not {bpe_merges}")
    workers = max(1, workers)
    download_md5 = check_md5_option(download_md5)
    if archive is None:
        archive = download_archive(
            download_url,
            os.path.join(workdir, "orig", ARCHIVE_NAME),
            md5=download_md5,
            allow_md5_mismatch=allow_md5_mismatch,
        )
    archive = os.path.abspath(archive)
    if not os.path.isfile(archive):
        raise ExperimentError(f"{archive}: archive not found")

    prep = os.path.join(workdir, PREP_NAME)
    tmp = os.path.join(prep, "tmp")
    data_bin = os.path.join(workdir, "data-bin", PREP_NAME)
    records = _StepRecords(workdir)

    settings = {
        "archive": archive,
        "archive_bytes": os.path.getsize(archive),
        "archive_mtime_ns": os.stat(archive).st_mtime_ns,
    }
    _tokenize_step(archive, tmp, records, settings, workers)
    settings = dict(
        settings, ratio=CLEAN_RATIO, min_tokens=CLEAN_MIN_TOKENS, max_tokens=CLEAN_MAX_TOKENS
    )
    _clean_step(tmp, records, settings)
    _split_step(archive, tmp, records, settings, expect_real_counts)
    settings = dict(settings, bpe_merges=bpe_merges)
    _bpe_step(tmp, prep, records, settings, bpe_merges, workers)
    settings = dict(settings, joined_dictionary=joined_dictionary)
    _binarize_step(prep, data_bin, records, settings, joined_dictionary, workers)
    counts = {
        split: len(read_lines(os.path.join(prep, f"{split}.{SOURCE_LANG}"))) for split in SPLITS
    }
    logger.info("IWSLT'14 de-en ready in %s: %s pairs (BPE)", data_bin, _count_report(counts))
    return data_bin


def _tokenize_step(
    archive: str, tmp: str, records: _StepRecords, settings: dict, workers: int
) -> None:
    names = (TRAIN_STEM,) + TEST_STEMS
    outputs = {
        (name, lang): os.path.join(
            tmp, f"{name}.tok.{lang}" if name == TRAIN_STEM else f"{name}.{lang}"
        )
        for name in names
        for lang in LANGUAGES
    }
    raw_outputs = {key: os.path.join(tmp, f"{key[0]}.raw.{key[1]}") for key in outputs}
    if records.is_done("tokenize", settings, list(outputs.values()) + list(raw_outputs.values())):
        logger.info("tokenize: done before, skipped")
        return
    logger.info("tokenize: reading %s", archive)
    texts = extract_texts(archive)
    for name in names:
        logger.info(
            "tokenize: %s has %d text lines per language", name, len(texts[name, SOURCE_LANG])
        )
    os.makedirs(tmp, exist_ok=True)
    logger.info("tokenize: Moses tokenizer on %d processes", workers)
    lowercase = {name: name != TRAIN_STEM for name in names}
    for key, lines in tokenize_texts(texts, lowercase=lowercase, workers=workers).items():
        write_lines(outputs[key], lines)
    for key, lines in texts.items():
        write_lines(raw_outputs[key], lines)
    records.mark_done("tokenize", settings)


def _clean_step(tmp: str, records: _StepRecords, settings: dict) -> None:
    clean = {lang: os.path.join(tmp, f"{TRAIN_STEM}.clean.{lang}") for lang in LANGUAGES}
    lowered = {lang: os.path.join(tmp, f"{TRAIN_STEM}.{lang}") for lang in LANGUAGES}
    raw = {lang: os.path.join(tmp, f"{TRAIN_STEM}.clean.raw.{lang}") for lang in LANGUAGES}
    if records.is_done("clean", settings, [*clean.values(), *lowered.values(), *raw.values()]):
        logger.info("clean: done before, skipped")
        return
    tokenized = {
        lang: read_lines(os.path.join(tmp, f"{TRAIN_STEM}.tok.{lang}")) for lang in LANGUAGES
    }
    untokenized = {
        lang: read_lines(os.path.join(tmp, f"{TRAIN_STEM}.raw.{lang}")) for lang in LANGUAGES
    }
    kept = clean_corpus(tokenized[SOURCE_LANG], tokenized[TARGET_LANG])
    logger.info(
        "clean: kept %d of %d training pairs (ratio %s, %d-%d tokens)",
        len(kept),
        len(tokenized[SOURCE_LANG]),
        CLEAN_RATIO,
        CLEAN_MIN_TOKENS,
        CLEAN_MAX_TOKENS,
    )
    for side, lang in ((1, SOURCE_LANG), (2, TARGET_LANG)):
        write_lines(clean[lang], (pair[side] for pair in kept))
        write_lines(lowered[lang], (perl_lowercase(pair[side]) for pair in kept))
        write_lines(
            raw[lang],
            (perl_lowercase(perl_normalize_space(untokenized[lang][pair[0]])) for pair in kept),
        )
    records.mark_done("clean", settings)


def _split_step(
    archive: str,
    tmp: str,
    records: _StepRecords,
    settings: dict,
    expect_real_counts: Optional[bool],
) -> None:
    outputs = [
        os.path.join(tmp, f"{split}{kind}.{lang}")
        for split in SPLITS
        for kind in ("", ".raw")
        for lang in LANGUAGES
    ]
    if records.is_done("split", settings, outputs):
        logger.info("split: done before, skipped")
        return
    splits: Dict[Tuple[str, str, str], List[str]] = {}
    for kind, train_name in (("", TRAIN_STEM), (".raw", f"{TRAIN_STEM}.clean.raw")):
        for lang in LANGUAGES:
            lines = read_lines(os.path.join(tmp, f"{train_name}.{lang}"))
            splits["train", kind, lang] = [
                line for number, line in enumerate(lines, 1) if not is_valid_line(number)
            ]
            splits["valid", kind, lang] = [
                line for number, line in enumerate(lines, 1) if is_valid_line(number)
            ]
            splits["test", kind, lang] = []
            for stem in TEST_STEMS:
                test_lines = read_lines(os.path.join(tmp, f"{stem}{kind}.{lang}"))
                if kind == ".raw":
                    test_lines = [perl_lowercase(perl_normalize_space(line)) for line in test_lines]
                splits["test", kind, lang].extend(test_lines)
    counts = {split: len(splits[split, "", SOURCE_LANG]) for split in SPLITS}
    logger.info("split: %s pairs", _count_report(counts))
    is_real = expect_real_counts
    if is_real is None:
        is_real = counts["train"] + counts["valid"] >= REAL_CORPUS_MIN_PAIRS
    if is_real and counts != REAL_COUNTS:
        raise ExperimentError(
            f"{archive}: split sizes {_count_report(counts)} differ from the real IWSLT'14 "
            f"{_count_report(REAL_COUNTS)} "
            "(expect_real_counts=False / --no-expect-real-counts for another corpus)"
        )
    for (split, kind, lang), lines in splits.items():
        write_lines(os.path.join(tmp, f"{split}{kind}.{lang}"), lines)
    records.mark_done("split", settings)


def _bpe_step(
    tmp: str, prep: str, records: _StepRecords, settings: dict, merges: int, workers: int
) -> None:
    from subword_nmt.learn_bpe import learn_bpe

    codes = os.path.join(prep, "code")
    outputs = {
        (split, lang): os.path.join(prep, f"{split}.{lang}")
        for split in SPLITS
        for lang in LANGUAGES
    }
    if records.is_done("subword", settings, [codes, *outputs.values()]):
        logger.info("bpe: done before, skipped")
        return
    train_text = "".join(
        line + "\n" for lang in LANGUAGES for line in read_lines(os.path.join(tmp, f"train.{lang}"))
    )
    logger.info("bpe: learning %d merges on train.%s + train.%s", merges, SOURCE_LANG, TARGET_LANG)
    learned = io.StringIO()
    learn_bpe(io.StringIO(train_text), learned, merges)
    write_lines(codes, split_lines(learned.getvalue()))
    jobs, owners = [], []
    for key in outputs:
        for chunk in _chunked(
            read_lines(os.path.join(tmp, f"{key[0]}.{key[1]}")), SUBWORD_CHUNK_LINES
        ):
            jobs.append((codes, list(chunk)))
            owners.append(key)
    logger.info("bpe: applying %s to every split on %d processes", codes, workers)
    segmented: Dict[Tuple[str, str], List[str]] = {key: [] for key in outputs}
    for owner, lines in zip(owners, _map_chunks(_apply_bpe_chunk, jobs, workers)):
        segmented[owner].extend(lines)
    for key, path in outputs.items():
        write_lines(path, segmented[key])
    records.mark_done("subword", settings)


def _binarize_step(
    prep: str,
    data_bin: str,
    records: _StepRecords,
    settings: dict,
    joined_dictionary: bool,
    workers: int,
) -> None:
    if records.is_done(
        "binarize", settings, [os.path.join(data_bin, f"dict.{lang}.txt") for lang in LANGUAGES]
    ):
        logger.info("binarize: done before, skipped")
        return
    prefixes = {split: os.path.join(prep, split) for split in SPLITS}
    fairseq_preprocess(prefixes, data_bin, joined_dictionary=joined_dictionary, workers=workers)
    records.mark_done("binarize", settings)


def fairseq_preprocess(
    prefixes: Dict[str, str],
    dest: str,
    *,
    src: str = SOURCE_LANG,
    tgt: str = TARGET_LANG,
    joined_dictionary: bool = False,
    workers: int = 1,
) -> str:
    """fairseq-preprocess of the text files `{prefix}.{src}` / `{prefix}.{tgt}` of each split
    (`prefixes`: split -> prefix, splits among train/valid/test, train first for the
    dictionaries) into the folder `dest`, which appears only when complete; returns `dest`."""
    from fairseq import options
    from fairseq_cli import preprocess

    with atomic_output(dest) as temporary:
        argv = [
            "--source-lang",
            src,
            "--target-lang",
            tgt,
            "--destdir",
            temporary,
            "--workers",
            str(workers),
        ]
        for split, prefix in prefixes.items():
            argv += [f"--{split}pref", prefix]
        if joined_dictionary:
            argv.append("--joined-dictionary")
        logger.info("binarize: fairseq-preprocess %s", " ".join(argv))
        preprocess_logger = logging.getLogger(preprocess.__name__)
        handlers_before = list(preprocess_logger.handlers)
        try:
            preprocess.main(options.get_preprocessing_parser().parse_args(argv))
        finally:  # preprocess adds a log-file handler on every call; it must not outlive the call
            for handler in preprocess_logger.handlers[len(handlers_before) :]:
                preprocess_logger.removeHandler(handler)
                handler.close()
    return dest


# --------------------------------------------------------------------------------------------
# Parity with Moses tokenizer.perl (needs perl and a Moses checkout; not part of the recipe)
# --------------------------------------------------------------------------------------------

TOKENIZER_PERL = os.path.join("scripts", "tokenizer", "tokenizer.perl")
PARITY_EXAMPLES = 5


def tokenizer_perl(moses_dir: str, lang: str, lines: Sequence[str]) -> List[str]:
    """`lines` through `perl tokenizer.perl -l lang` of the Moses checkout `moses_dir`, as
    prepare-iwslt14.sh runs it (one process; the output does not depend on -threads)."""
    script = os.path.join(moses_dir, TOKENIZER_PERL)
    if not os.path.isfile(script):
        raise SettingError(f"--moses-dir {moses_dir}: no {TOKENIZER_PERL} in it")
    completed = subprocess.run(
        ["perl", script, "-l", lang, "-threads", "1"],
        input="".join(line + "\n" for line in lines).encode("utf-8"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
    )
    if completed.returncode != 0:
        raise ExperimentError(
            f"{script} failed: {completed.stderr.decode('utf-8', 'replace')[-500:]}"
        )
    output = split_lines(completed.stdout.decode("utf-8"))
    if len(output) != len(lines):
        raise ExperimentError(f"{script} printed {len(output)} lines for {len(lines)}")
    return output


@dataclasses.dataclass
class TokenizerParity:
    """How many of `lines` lines of one language each tokenizer tokenizes unlike tokenizer.perl."""

    lang: str
    lines: int
    ours_differ: int  # MosesPerlTokenizer, the recipe's tokenizer
    sacremoses_differ: int  # sacremoses' MosesTokenizer as it comes
    examples: List[Tuple[str, str, str]]  # (line, tokenizer.perl, ours) where they differ


def tokenizer_parity(
    moses_dir: str, texts: Dict[Tuple[str, str], List[str]]
) -> List[TokenizerParity]:
    """Every text of `extract_texts` tokenized by tokenizer.perl, by MosesPerlTokenizer and by
    plain sacremoses (`-l de` / `-l en`, escaping on, before lowercasing), compared line by line."""
    results = []
    for lang in LANGUAGES:
        lines = [
            line for (_, text_lang), text in texts.items() if text_lang == lang for line in text
        ]
        perl = tokenizer_perl(moses_dir, lang, lines)
        ours_tokenizer, plain = MosesPerlTokenizer(lang), MosesTokenizer(lang=lang)
        ours = [ours_tokenizer.tokenize_line(line) for line in lines]
        sacremoses_lines = [plain.tokenize(line, return_str=True, escape=True) for line in lines]
        differ = [i for i, (a, b) in enumerate(zip(perl, ours)) if a != b]
        results.append(
            TokenizerParity(
                lang,
                len(lines),
                len(differ),
                sum(a != b for a, b in zip(perl, sacremoses_lines)),
                [(lines[i], perl[i], ours[i]) for i in differ[:PARITY_EXAMPLES]],
            )
        )
    return results


def format_parity(results: Sequence[TokenizerParity]) -> str:
    lines = []
    for r in results:
        lines.append(
            f"-l {r.lang}: {r.lines} lines; MosesPerlTokenizer differs from tokenizer.perl on "
            f"{r.ours_differ} ({100 * r.ours_differ / max(r.lines, 1):.3f}%), sacremoses on "
            f"{r.sacremoses_differ} ({100 * r.sacremoses_differ / max(r.lines, 1):.3f}%)"
        )
        for line, perl, ours in r.examples:
            lines.append(f"  line:  {line!r}\n  perl:  {perl!r}\n  ours:  {ours!r}")
    return "\n".join(lines)


# TEMPORARY (branch launch, until the prepare helper's prepare.py is merged): design.md's API
# on the code above.  The merge takes the prepare helper's file; delete this block.
DATA_BIN = os.path.join("data-bin", PREP_NAME)


def data_folder_name(archive: str, bpe_merges: int) -> str:
    return f"iwslt14-de-en-{_md5(archive)[:10]}-bpe{bpe_merges}"


def reference_files(data_dir: str) -> Dict[str, str]:
    return {s: os.path.join(data_dir, PREP_NAME, "tmp", f"{s}.raw.en") for s in ("valid", "test")}


_prepare_in_workdir = prepare_iwslt14


def prepare_iwslt14(archive, data_root, bpe_merges=DEFAULT_BPE_MERGES, workers=1):  # noqa: F811
    data_dir = os.path.join(data_root, data_folder_name(archive, bpe_merges))
    _prepare_in_workdir(archive, data_dir, bpe_merges=bpe_merges, workers=workers)
    return data_dir
