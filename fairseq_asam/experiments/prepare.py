"""IWSLT'14 German-English, prepared as fairseq's `examples/translation/prepare-iwslt14.sh`, in Python.

The recipe, step by step (file names relative to `workdir`):

1. archive: `orig/de-en.tgz`, downloaded from fairseq's mirror unless a local archive is given.
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
5. subword -> `iwslt14.tokenized.de-en/{train,valid,test}.{de,en}`
   - `bpe` (the recipe): subword-nmt learn_bpe with `bpe_merges` merges (10,000) on train.de
     followed by train.en, written to `code`, and apply_bpe on every split;
   - `sentencepiece`: one SentencePiece model (`spm.model`, unigram, vocabulary size
     `bpe_merges`) trained on the untokenized `train.raw.de` + `train.raw.en`, applied to the
     `*.raw.*` text of every split; detokenized BLEU (sacrebleu) is then the natural metric.
6. binarize: fairseq-preprocess into `data-bin/iwslt14.tokenized.de-en` (separate dictionaries,
   or `--joined-dictionary`).

Every step writes its files under temporary names (`*.partial`) and renames them when complete,
then records its settings in `.prepare-iwslt14/<step>.json`. A re-run skips a step whose record
matches and whose files all exist, and redoes it otherwise; each step's settings include those
of the steps before it, so a changed setting redoes every step from the first it affects.
"""
import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex
from sacremoses import MosesTokenizer
from sacremoses.corpus import NonbreakingPrefixes

logger = logging.getLogger(__name__)

SRC, TGT = "de", "en"
LANGUAGES = (SRC, TGT)
SPLITS = ("train", "valid", "test")

# fairseq's current mirror of the WIT3 archive (the original wit3.fbk.eu link is gone).
DOWNLOAD_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
ARCHIVE_NAME = "de-en.tgz"
# MD5 of the mirror's de-en.tgz as published with other preparation scripts; a mismatch is
# logged, and the line counts of step 4 remain the binding check.
ARCHIVE_MD5 = "10936dfdf616504ddbd844e91b94ef4a"
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
SUBWORD_METHODS = ("bpe", "sentencepiece")
TOKENIZE_CHUNK_LINES = 2000
SUBWORD_CHUNK_LINES = 5000

PREP_NAME = "iwslt14.tokenized.de-en"
STATE_FOLDER = ".prepare-iwslt14"
PARTIAL_SUFFIX = ".partial"


class Iwslt14DataError(Exception):
    """The input (archive, member file, flag) is unusable; the message names it in one line."""


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
            raise ValueError(f"MosesPerlTokenizer reproduces tokenizer.perl for {LANGUAGES}, not {lang!r}")
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
            elif ("." in prefix and HAS_ALPHA.search(prefix)) or kind == NONBREAKING or STARTS_LOWER.match(next_word):
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
    return [lines[start:start + size] for start in range(0, len(lines), size)]


def tokenize_texts(texts: Dict[Tuple[str, str], List[str]], *, lowercase: Dict[str, bool], workers: int) -> Dict[Tuple[str, str], List[str]]:
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
    truncated or corrupt one fails here, with an `Iwslt14DataError` naming the archive."""
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
        raise Iwslt14DataError(f"{archive}: archive not found") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise Iwslt14DataError(f"{archive}: corrupt or truncated archive ({exc})") from None
    missing = [name for name in archive_members() if name not in contents]
    if missing:
        raise Iwslt14DataError(f"{archive}: missing member {missing[0]}")
    lines = {}
    for name, data in contents.items():
        try:
            lines[name] = split_lines(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise Iwslt14DataError(f"{archive}: member {name} is not UTF-8 (byte {exc.start})") from None
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
        if counts[SRC] != counts[TGT]:
            suffix = "" if stem == TRAIN_STEM else ".xml"
            raise Iwslt14DataError(
                f"{archive}: {ARCHIVE_FOLDER}/{stem}.{SRC}{suffix} has {counts[SRC]} text lines but "
                f"{ARCHIVE_FOLDER}/{stem}.{TGT}{suffix} has {counts[TGT]}"
            )
    return texts


def download_archive(url: str, destination: str, *, attempts: int = DOWNLOAD_ATTEMPTS) -> str:
    """Downloads `url` to `destination` through `destination.partial`, resuming an interrupted
    download with an HTTP Range request, retrying failures, checking the size the server
    announced and the MD5 of fairseq's archive; the file appears under its name only when whole."""
    if os.path.exists(destination):
        return destination
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    partial = destination + PARTIAL_SUFFIX
    failure: Optional[Exception] = None
    for attempt in range(1, attempts + 1):
        try:
            _download_resuming(url, partial)
            break
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failure = exc
            logger.warning("download of %s failed (attempt %d of %d): %s", url, attempt, attempts, exc)
            if attempt < attempts:
                time.sleep(DOWNLOAD_RETRY_SECONDS * attempt)
    else:
        raise Iwslt14DataError(f"{url}: download failed {attempts} times ({failure}); pass a local --archive")
    digest = _md5(partial)
    if url == DOWNLOAD_URL and digest != ARCHIVE_MD5:
        logger.warning("%s: MD5 %s differs from the known %s; the line counts will tell", url, digest, ARCHIVE_MD5)
    os.replace(partial, destination)
    logger.info("downloaded %s to %s (%d bytes, MD5 %s)", url, destination, os.path.getsize(destination), digest)
    return destination


def _download_resuming(url: str, partial: str) -> None:
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch
            return
        raise
    with response:
        if response.status == 206:
            total = int(response.headers["Content-Range"].rsplit("/", 1)[1])
            mode = "ab"
        else:  # the server sent the whole file
            total = int(response.headers.get("Content-Length", -1))
            have, mode = 0, "wb"
        with open(partial, mode) as out:
            for block in iter(lambda: response.read(READ_BLOCK_BYTES), b""):
                out.write(block)
                have += len(block)
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


def clean_corpus(src_lines: Sequence[str], tgt_lines: Sequence[str], *, ratio: float = CLEAN_RATIO,
                 min_tokens: int = CLEAN_MIN_TOKENS, max_tokens: int = CLEAN_MAX_TOKENS) -> List[Tuple[int, str, str]]:
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


def write_lines(path: str, lines: Iterable[str]) -> None:
    """Writes `path.partial`, then renames it: `path` never holds a part of the lines."""
    partial = path + PARTIAL_SUFFIX
    with open(partial, "w", encoding="utf-8", newline="\n") as out:
        for line in lines:
            out.write(line)
            out.write("\n")
    os.replace(partial, path)


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
        write_lines(os.path.join(self.folder, f"{step}.json"), [json.dumps(settings, sort_keys=True)])


def _count_report(counts: Dict[str, int]) -> str:
    return ", ".join(f"{split} {counts[split]:,}" for split in SPLITS)


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------

def prepare_iwslt14(
    archive: Optional[str],
    workdir: str,
    *,
    subword: str = "bpe",
    bpe_merges: int = DEFAULT_BPE_MERGES,
    joined_dictionary: bool = False,
    workers: int = os.cpu_count() or 1,
    expect_real_counts: Optional[bool] = None,
    download_url: str = DOWNLOAD_URL,
) -> str:
    """Runs the recipe of the module docstring; returns `workdir/data-bin/iwslt14.tokenized.de-en`.

    `archive`: a local `de-en.tgz`, or None to download `download_url` to `workdir/orig/`.
    `subword`: "bpe" (the recipe) or "sentencepiece"; `bpe_merges`: the number of BPE merges,
    or the SentencePiece vocabulary size. `joined_dictionary`: one fairseq dictionary for both
    languages. `workers`: processes for tokenization, apply_bpe and fairseq-preprocess.
    `expect_real_counts`: check the split sizes against the real corpus's 160,239 / 7,283 /
    6,750; None checks them when the cleaned training text has at least 100,000 pairs.
    Raises `Iwslt14DataError` for an unusable archive or flag, before writing the step's files.
    """
    if subword not in SUBWORD_METHODS:
        raise Iwslt14DataError(f"subword: {subword!r} is not one of {', '.join(SUBWORD_METHODS)}")
    if bpe_merges < 1:
        raise Iwslt14DataError(f"bpe_merges: must be positive, not {bpe_merges}")
    workers = max(1, workers)
    if archive is None:
        archive = download_archive(download_url, os.path.join(workdir, "orig", ARCHIVE_NAME))
    archive = os.path.abspath(archive)
    if not os.path.isfile(archive):
        raise Iwslt14DataError(f"{archive}: archive not found")

    prep = os.path.join(workdir, PREP_NAME)
    tmp = os.path.join(prep, "tmp")
    data_bin = os.path.join(workdir, "data-bin", PREP_NAME)
    records = _StepRecords(workdir)

    settings = {"archive": archive, "archive_bytes": os.path.getsize(archive), "archive_mtime_ns": os.stat(archive).st_mtime_ns}
    _tokenize_step(archive, tmp, records, settings, workers)
    settings = dict(settings, ratio=CLEAN_RATIO, min_tokens=CLEAN_MIN_TOKENS, max_tokens=CLEAN_MAX_TOKENS)
    _clean_step(tmp, records, settings)
    _split_step(archive, tmp, records, settings, expect_real_counts)
    settings = dict(settings, subword=subword, bpe_merges=bpe_merges)
    if subword == "bpe":
        _bpe_step(tmp, prep, records, settings, bpe_merges, workers)
    else:
        _sentencepiece_step(tmp, prep, records, settings, bpe_merges, workers)
    settings = dict(settings, joined_dictionary=joined_dictionary)
    _binarize_step(prep, data_bin, records, settings, joined_dictionary, workers)
    counts = {split: len(read_lines(os.path.join(prep, f"{split}.{SRC}"))) for split in SPLITS}
    logger.info("IWSLT'14 de-en ready in %s: %s pairs (%s)", data_bin, _count_report(counts), subword)
    if subword == "sentencepiece":
        logger.info("subword=sentencepiece: the text is not Moses-tokenized; score detokenized output with "
                    "sacrebleu against %s (SentencePiece model %s)",
                    os.path.join(tmp, f"test.raw.{TGT}"), os.path.join(prep, "spm.model"))
    return data_bin


def _tokenize_step(archive: str, tmp: str, records: _StepRecords, settings: dict, workers: int) -> None:
    names = (TRAIN_STEM,) + TEST_STEMS
    outputs = {(name, lang): os.path.join(tmp, f"{name}.tok.{lang}" if name == TRAIN_STEM else f"{name}.{lang}")
               for name in names for lang in LANGUAGES}
    raw_outputs = {key: os.path.join(tmp, f"{key[0]}.raw.{key[1]}") for key in outputs}
    if records.is_done("tokenize", settings, list(outputs.values()) + list(raw_outputs.values())):
        logger.info("tokenize: done before, skipped")
        return
    logger.info("tokenize: reading %s", archive)
    texts = extract_texts(archive)
    for name in names:
        logger.info("tokenize: %s has %d text lines per language", name, len(texts[name, SRC]))
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
    tokenized = {lang: read_lines(os.path.join(tmp, f"{TRAIN_STEM}.tok.{lang}")) for lang in LANGUAGES}
    untokenized = {lang: read_lines(os.path.join(tmp, f"{TRAIN_STEM}.raw.{lang}")) for lang in LANGUAGES}
    kept = clean_corpus(tokenized[SRC], tokenized[TGT])
    logger.info("clean: kept %d of %d training pairs (ratio %s, %d-%d tokens)",
                len(kept), len(tokenized[SRC]), CLEAN_RATIO, CLEAN_MIN_TOKENS, CLEAN_MAX_TOKENS)
    for side, lang in ((1, SRC), (2, TGT)):
        write_lines(clean[lang], (pair[side] for pair in kept))
        write_lines(lowered[lang], (perl_lowercase(pair[side]) for pair in kept))
        write_lines(raw[lang], (perl_lowercase(perl_normalize_space(untokenized[lang][pair[0]])) for pair in kept))
    records.mark_done("clean", settings)


def _split_step(archive: str, tmp: str, records: _StepRecords, settings: dict, expect_real_counts: Optional[bool]) -> None:
    outputs = [os.path.join(tmp, f"{split}{kind}.{lang}") for split in SPLITS for kind in ("", ".raw") for lang in LANGUAGES]
    if records.is_done("split", settings, outputs):
        logger.info("split: done before, skipped")
        return
    splits: Dict[Tuple[str, str, str], List[str]] = {}
    for kind, train_name in (("", TRAIN_STEM), (".raw", f"{TRAIN_STEM}.clean.raw")):
        for lang in LANGUAGES:
            lines = read_lines(os.path.join(tmp, f"{train_name}.{lang}"))
            splits["train", kind, lang] = [line for number, line in enumerate(lines, 1) if not is_valid_line(number)]
            splits["valid", kind, lang] = [line for number, line in enumerate(lines, 1) if is_valid_line(number)]
            splits["test", kind, lang] = []
            for stem in TEST_STEMS:
                test_lines = read_lines(os.path.join(tmp, f"{stem}{kind}.{lang}"))
                if kind == ".raw":
                    test_lines = [perl_lowercase(perl_normalize_space(line)) for line in test_lines]
                splits["test", kind, lang].extend(test_lines)
    counts = {split: len(splits[split, "", SRC]) for split in SPLITS}
    logger.info("split: %s pairs", _count_report(counts))
    is_real = expect_real_counts
    if is_real is None:
        is_real = counts["train"] + counts["valid"] >= REAL_CORPUS_MIN_PAIRS
    if is_real and counts != REAL_COUNTS:
        raise Iwslt14DataError(
            f"{archive}: split sizes {_count_report(counts)} differ from the real IWSLT'14 "
            f"{_count_report(REAL_COUNTS)} (expect_real_counts=False / --no-expect-real-counts for another corpus)"
        )
    for (split, kind, lang), lines in splits.items():
        write_lines(os.path.join(tmp, f"{split}{kind}.{lang}"), lines)
    records.mark_done("split", settings)


def _bpe_step(tmp: str, prep: str, records: _StepRecords, settings: dict, merges: int, workers: int) -> None:
    from subword_nmt.learn_bpe import learn_bpe

    codes = os.path.join(prep, "code")
    outputs = {(split, lang): os.path.join(prep, f"{split}.{lang}") for split in SPLITS for lang in LANGUAGES}
    if records.is_done("subword", settings, [codes, *outputs.values()]):
        logger.info("bpe: done before, skipped")
        return
    train_text = "".join(line + "\n" for lang in LANGUAGES for line in read_lines(os.path.join(tmp, f"train.{lang}")))
    logger.info("bpe: learning %d merges on train.%s + train.%s", merges, SRC, TGT)
    learned = io.StringIO()
    learn_bpe(io.StringIO(train_text), learned, merges)
    write_lines(codes, split_lines(learned.getvalue()))
    jobs, owners = [], []
    for key in outputs:
        for chunk in _chunked(read_lines(os.path.join(tmp, f"{key[0]}.{key[1]}")), SUBWORD_CHUNK_LINES):
            jobs.append((codes, list(chunk)))
            owners.append(key)
    logger.info("bpe: applying %s to every split on %d processes", codes, workers)
    segmented: Dict[Tuple[str, str], List[str]] = {key: [] for key in outputs}
    for owner, lines in zip(owners, _map_chunks(_apply_bpe_chunk, jobs, workers)):
        segmented[owner].extend(lines)
    for key, path in outputs.items():
        write_lines(path, segmented[key])
    records.mark_done("subword", settings)


def _sentencepiece_step(tmp: str, prep: str, records: _StepRecords, settings: dict, vocab_size: int, workers: int) -> None:
    import sentencepiece

    model = os.path.join(prep, "spm.model")
    outputs = {(split, lang): os.path.join(prep, f"{split}.{lang}") for split in SPLITS for lang in LANGUAGES}
    if records.is_done("subword", settings, [model, *outputs.values()]):
        logger.info("sentencepiece: done before, skipped")
        return
    partial_prefix = os.path.join(prep, "spm" + PARTIAL_SUFFIX)
    logger.info("sentencepiece: training a joint model of %d pieces on train.raw.%s + train.raw.%s", vocab_size, SRC, TGT)
    sentencepiece.SentencePieceTrainer.train(
        input=[os.path.join(tmp, f"train.raw.{lang}") for lang in LANGUAGES],
        model_prefix=partial_prefix,
        vocab_size=vocab_size,
        character_coverage=1.0,
        model_type="unigram",
        hard_vocab_limit=False,  # a small corpus may not fill `vocab_size`
        num_threads=workers,
        minloglevel=2,
    )
    os.replace(partial_prefix + ".vocab", os.path.join(prep, "spm.vocab"))
    os.replace(partial_prefix + ".model", model)
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    for (split, lang), path in outputs.items():
        lines = read_lines(os.path.join(tmp, f"{split}.raw.{lang}"))
        pieces = processor.encode(lines, out_type=str, num_threads=workers)
        write_lines(path, (" ".join(line_pieces) for line_pieces in pieces))
    records.mark_done("subword", settings)


def _binarize_step(prep: str, data_bin: str, records: _StepRecords, settings: dict, joined_dictionary: bool, workers: int) -> None:
    from fairseq import options
    from fairseq_cli import preprocess

    if records.is_done("binarize", settings, [os.path.join(data_bin, f"dict.{lang}.txt") for lang in LANGUAGES]):
        logger.info("binarize: done before, skipped")
        return
    partial = data_bin + PARTIAL_SUFFIX
    shutil.rmtree(partial, ignore_errors=True)
    argv = ["--source-lang", SRC, "--target-lang", TGT, "--destdir", partial, "--workers", str(workers)]
    for split in SPLITS:
        argv += [f"--{split}pref", os.path.join(prep, split)]
    if joined_dictionary:
        argv.append("--joined-dictionary")
    logger.info("binarize: fairseq-preprocess %s", " ".join(argv))
    preprocess_logger = logging.getLogger(preprocess.__name__)
    handlers_before = list(preprocess_logger.handlers)
    try:
        preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    finally:  # preprocess adds a log-file handler on every call; it must not outlive the call
        for handler in preprocess_logger.handlers[len(handlers_before):]:
            preprocess_logger.removeHandler(handler)
            handler.close()
    shutil.rmtree(data_bin, ignore_errors=True)
    os.replace(partial, data_bin)
    records.mark_done("binarize", settings)


# --------------------------------------------------------------------------------------------
# A small archive in the real layout
# --------------------------------------------------------------------------------------------

# German -> English, word by word and in the same order, so a tiny Transformer learns it fast.
SAMPLE_DETERMINERS = {"der": "the", "die": "the", "das": "the", "ein": "a", "eine": "a"}
SAMPLE_ADJECTIVES = {"große": "big", "kleine": "small", "alte": "old", "neue": "new", "schöne": "beautiful",
                     "grüne": "green", "rote": "red", "schnelle": "fast"}
SAMPLE_NOUNS = {"Hund": "dog", "Katze": "cat", "Mädchen": "girl", "Junge": "boy", "Haus": "house", "Baum": "tree",
                "Buch": "book", "Stadt": "city", "Straße": "street", "Vogel": "bird", "Lehrer": "teacher",
                "Fisch": "fish", "Garten": "garden", "Tür": "door", "Brücke": "bridge", "Apfel": "apple"}
SAMPLE_VERBS = {"sieht": "sees", "liebt": "loves", "findet": "finds", "baut": "builds", "kennt": "knows",
                "hört": "hears", "malt": "paints", "sucht": "seeks", "trägt": "carries", "öffnet": "opens"}
SAMPLE_ADVERBS = {"heute": "today", "oft": "often", "auch": "also", "wieder": "again"}
SAMPLE_END_MARKS = (".", ".", ".", "!", "?")
SAMPLE_LINES_PER_TALK = 20
SAMPLE_SEGMENTS_PER_DOC = 10
SAMPLE_REPEATED_PHRASE = ("der Hund sieht die Katze", "the dog sees the cat")  # 5 tokens
SAMPLE_MAX_PAIR = (" ".join([SAMPLE_REPEATED_PHRASE[0]] * 35), " ".join([SAMPLE_REPEATED_PHRASE[1]] * 35))
# Training pairs that exercise the rules; they open the first talk of `train.tags.de-en.*`.
SAMPLE_RULE_PAIRS = (
    ("Der Hund sieht die Katze, und das Mädchen lacht!", "The dog sees the cat, and the girl laughs!"),
    ("Das Mädchen findet den Apfel des Lehrers.", "The girl finds the teacher\u2019s apple."),
    ("Wir fahren in die U.S.A.", "We drive to the U.S.A."),
    ("Der Vogel singt ...", "The bird sings ..."),
    ('Der "Hund" & die <Katze> [sic] | ok', 'The "dog" & the <cat> [sic] | ok'),
    SAMPLE_MAX_PAIR,  # 175 tokens: kept
    (SAMPLE_MAX_PAIR[0] + " heute", SAMPLE_MAX_PAIR[1] + " today"),  # 176 tokens: dropped
    ("Der Hund schläft .", "The old dog sleeps very often ."),  # 4 : 7 tokens, ratio 1.75: dropped
    ("Die Katze schläft .", "The small cat sleeps today ."),  # 4 : 6 tokens, ratio 1.5: kept
    ("", ""),  # empty: dropped
)
# Dev/test segments with ’, which becomes ' there (and stays ’ in the training text).
SAMPLE_QUOTE_PAIR = ("Wie geht\u2019s dem Hund?", "How\u2019s the dog?")


def sample_sentence_pair(rng: random.Random) -> Tuple[str, str]:
    """A random German sentence and its word-by-word English translation, capitalized."""
    words: List[Tuple[str, str]] = []

    def noun_phrase() -> None:
        words.append(rng.choice(list(SAMPLE_DETERMINERS.items())))
        if rng.random() < 0.5:
            words.append(rng.choice(list(SAMPLE_ADJECTIVES.items())))
        words.append(rng.choice(list(SAMPLE_NOUNS.items())))

    noun_phrase()
    words.append(rng.choice(list(SAMPLE_VERBS.items())))
    noun_phrase()
    if rng.random() < 0.3:
        words.append(rng.choice(list(SAMPLE_ADVERBS.items())))
    mark = rng.choice(SAMPLE_END_MARKS)
    german, english = (" ".join(pair[side] for pair in words) for side in (0, 1))
    return german[0].upper() + german[1:] + mark, english[0].upper() + english[1:] + mark


def _sample_training_file(pairs: Sequence[Tuple[str, str]], side: int, lang: str, seed: int) -> str:
    rng = random.Random(f"{seed}/titles")  # titles and descriptions: the same for both sides
    lines = []
    for talk, start in enumerate(range(0, len(pairs), SAMPLE_LINES_PER_TALK), 1):
        title, description = sample_sentence_pair(rng), sample_sentence_pair(rng)
        lines += [
            f"<url>http://www.ted.com/talks/lang/{lang}/sample_talk_{talk}.html</url>",
            f"<keywords>talks, sample, {talk}</keywords>",
            f"<talkid>{talk}</talkid>",
            f"<title>{title[side]}</title>",
            f"<description>{description[side]}</description>",
        ]
        lines += [pair[side] for pair in pairs[start:start + SAMPLE_LINES_PER_TALK]]
    return "".join(line + "\n" for line in lines)


def _sample_xml_file(stem: str, pairs: Sequence[Tuple[str, str]], side: int, lang: str) -> str:
    set_id = "iwslt2014_" + stem.split(".")[2]
    opening = (f'<srcset setid="{set_id}" srclang="german">' if lang == SRC else
               f'<refset setid="{set_id}" srclang="german" trglang="english" refid="ref">')
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", opening]
    for doc, start in enumerate(range(0, len(pairs), SAMPLE_SEGMENTS_PER_DOC), 1):
        lines += [
            f'<doc docid="{doc}" genre="lectures">',
            f"<url>http://www.ted.com/talks/sample_{doc}.html</url>",
            f"<description>TED Talk Subtitles and Transcript: sample {doc}</description>",
            "<keywords>talks, sample</keywords>",
            f"<talkid>{doc}</talkid>",
            f"<title>Sample {doc}</title>",
        ]
        lines += [f'<seg id="{number}"> {pair[side]} </seg>'
                  for number, pair in enumerate(pairs[start:start + SAMPLE_SEGMENTS_PER_DOC], start + 1)]
        lines.append("</doc>")
    lines += ["</srcset>" if lang == SRC else "</refset>", "</mteval>"]
    return "".join(line + "\n" for line in lines)


def build_sample_archive(path: str, n_train: int = 300, n_dev: int = 40, seed: int = 1) -> str:
    """Writes a `de-en.tgz` in the real archive's layout (folder `de-en/`, the training files
    with their tag lines, the five dev/test XML files) holding `n_train` training pairs (the
    first ones are `SAMPLE_RULE_PAIRS`) and `n_dev` segments per dev/test file (the first
    dev2010 one is `SAMPLE_QUOTE_PAIR`), generated from a small lexicon with `seed`. The same
    arguments give the same bytes. Returns `path`."""
    if n_train < len(SAMPLE_RULE_PAIRS) or n_dev < 1:
        raise ValueError(f"build_sample_archive: n_train must be >= {len(SAMPLE_RULE_PAIRS)} and n_dev >= 1")
    rng = random.Random(seed)
    train_pairs = list(SAMPLE_RULE_PAIRS) + [sample_sentence_pair(rng) for _ in range(n_train - len(SAMPLE_RULE_PAIRS))]
    files = {}
    for side, lang in ((0, SRC), (1, TGT)):
        files[f"{TRAIN_STEM}.{lang}"] = _sample_training_file(train_pairs, side, lang, seed)
    for number, stem in enumerate(TEST_STEMS):
        stem_rng = random.Random(seed * 1000 + number)
        pairs = [sample_sentence_pair(stem_rng) for _ in range(n_dev)]
        if number == 0:
            pairs[0] = SAMPLE_QUOTE_PAIR
        for side, lang in ((0, SRC), (1, TGT)):
            files[f"{stem}.{lang}.xml"] = _sample_xml_file(stem, pairs, side, lang)
    _write_tgz(path, ARCHIVE_FOLDER, files)
    return path


def _write_tgz(path: str, folder: str, files: Dict[str, str]) -> None:
    """A reproducible .tgz (fixed times and owners) of `folder/` holding `files`, via `path.partial`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + PARTIAL_SUFFIX
    with open(partial, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:
            folder_entry = tarfile.TarInfo(folder)
            folder_entry.type, folder_entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder_entry)
            for name in sorted(files):
                data = files[name].encode("utf-8")
                entry = tarfile.TarInfo(f"{folder}/{name}")
                entry.size, entry.mode = len(data), 0o644
                tar.addfile(entry, io.BytesIO(data))
    os.replace(partial, path)
