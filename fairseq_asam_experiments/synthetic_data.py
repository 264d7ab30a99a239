"""The kit's generated corpora (the same bytes for the same arguments), and fairseq-preprocess:
the toy corpus (`write_corpus`, `binarize`) the tests and the README's quick start train on in
seconds, and the sample archive (`build_sample_archive`), a `de-en.tgz` in the real IWSLT'14
layout that the `tiny` preset prepares as the real archive.
"""

import gzip
import io
import logging
import os
import random
import tarfile
from typing import Dict, Tuple

from .files import atomic_output, write_lines

logger = logging.getLogger(__name__)

# The layout of IWSLT'14's de-en.tgz, which the sample archive reproduces and prepare reads.
SOURCE_LANG, TARGET_LANG = LANGUAGES = ("de", "en")
ARCHIVE_FOLDER, TRAIN_STEM = "de-en", "train.tags.de-en"
TEST_STEMS = tuple(  # in the order prepare concatenates them into the test split
    f"IWSLT14.{name}.de-en"
    for name in ("TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012")
)
TOY_LEXICON = {f"de{i}": f"en{i}" for i in range(40)}


def write_corpus(folder: str, sizes: Dict[str, int], src=SOURCE_LANG, tgt=TARGET_LANG) -> str:
    """The toy corpus `{split}.{src}` / `{split}.{tgt}` in `folder` for every split of `sizes`
    (pairs per split; target = source translated word by word, reversed); returns `folder`."""
    for offset, (split, count) in enumerate(sorted(sizes.items())):
        rng, words = random.Random(1000 + offset), list(TOY_LEXICON)
        sources = [[rng.choice(words) for _ in range(rng.randint(3, 12))] for _ in range(count)]
        targets = [[TOY_LEXICON[word] for word in reversed(source)] for source in sources]
        for lang, sentences in ((src, sources), (tgt, targets)):
            write_lines(os.path.join(folder, f"{split}.{lang}"), map(" ".join, sentences))
    return folder


def binarize(text_folder: str, dest: str, src: str = SOURCE_LANG, tgt: str = TARGET_LANG) -> str:
    """fairseq-preprocess of `write_corpus` output (the train, valid, test it has) into `dest`."""
    prefixes = {split: os.path.join(text_folder, split) for split in ("train", "valid", "test")}
    found = {split: p for split, p in prefixes.items() if os.path.exists(f"{p}.{src}")}
    return fairseq_preprocess(found, dest, src=src, tgt=tgt)


def fairseq_preprocess(prefixes: dict, dest: str, *, src=SOURCE_LANG, tgt=TARGET_LANG) -> str:
    """fairseq-preprocess of `{prefix}.{src}` / `{prefix}.{tgt}` (`prefixes`: split -> prefix,
    train first for the dictionaries) into `dest`, which appears only when complete."""
    from fairseq import options
    from fairseq_cli import preprocess

    with atomic_output(dest) as temporary:
        argv = ["-s", src, "-t", tgt, "--destdir", temporary]
        argv += [x for split, prefix in prefixes.items() for x in (f"--{split}pref", prefix)]
        logger.info("binarize: fairseq-preprocess %s", " ".join(argv))
        handlers_before = list(preprocess.logger.handlers)
        try:
            preprocess.main(options.get_preprocessing_parser().parse_args(argv))
        finally:  # preprocess adds a log-file handler on every call; it must not outlive the call
            for handler in preprocess.logger.handlers[len(handlers_before) :]:
                preprocess.logger.removeHandler(handler)
                handler.close()
    return dest


def _lexicon(pairs: str) -> Dict[str, str]:
    return dict(pair.split(":") for pair in pairs.split())


# German -> English, word by word and in the same order, so that a tiny Transformer learns it.
SAMPLE_DETERMINERS = _lexicon("der:the die:the das:the ein:a eine:a")
SAMPLE_ADJECTIVES = _lexicon(
    "große:big kleine:small alte:old neue:new schöne:beautiful grüne:green rote:red schnelle:fast"
)
SAMPLE_NOUNS = _lexicon(
    "Hund:dog Katze:cat Mädchen:girl Junge:boy Haus:house Baum:tree Buch:book Stadt:city "
    "Straße:street Vogel:bird Lehrer:teacher Fisch:fish Garten:garden Tür:door Brücke:bridge "
    "Apfel:apple"
)
SAMPLE_VERBS = _lexicon(
    "sieht:sees liebt:loves findet:finds baut:builds kennt:knows hört:hears malt:paints "
    "sucht:seeks trägt:carries öffnet:opens"
)
SAMPLE_ADVERBS = _lexicon("heute:today oft:often auch:also wieder:again")
SAMPLE_END_MARKS = (".", ".", ".", "!", "?")
SAMPLE_LINES_PER_TALK, SAMPLE_SEGMENTS_PER_DOC = 20, 10
SAMPLE_MAX_PAIR = tuple(
    " ".join([p] * 35) for p in ("der Hund sieht die Katze", "the dog sees the cat")
)
# Training pairs that exercise the rules; they open the first talk of `train.tags.de-en.*`.
SAMPLE_RULE_PAIRS = (
    (
        "Der Hund sieht die Katze, und das Mädchen lacht!",
        "The dog sees the cat, and the girl laughs!",
    ),
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
# A dev/test segment with ’, which becomes ' there (and stays ’ in the training text).
SAMPLE_QUOTE_PAIR = ("Wie geht\u2019s dem Hund?", "How\u2019s the dog?")


def sample_sentence_pair(rng: random.Random) -> Tuple[str, str]:
    """A random German sentence and its word-by-word English translation, capitalized."""
    words = []  # determiner, [adjective], noun, verb, determiner, [adjective], noun, [adverb]
    for part in (SAMPLE_DETERMINERS, SAMPLE_NOUNS, SAMPLE_VERBS, SAMPLE_DETERMINERS, SAMPLE_NOUNS):
        if part is SAMPLE_NOUNS and rng.random() < 0.5:
            words.append(rng.choice(list(SAMPLE_ADJECTIVES.items())))
        words.append(rng.choice(list(part.items())))
    if rng.random() < 0.3:
        words.append(rng.choice(list(SAMPLE_ADVERBS.items())))
    mark = rng.choice(SAMPLE_END_MARKS)
    german, english = (" ".join(pair[side] for pair in words) for side in (0, 1))
    return german[0].upper() + german[1:] + mark, english[0].upper() + english[1:] + mark


TALK_HEADER = """<url>http://www.ted.com/talks/lang/{lang}/sample_talk_{number}.html</url>
<keywords>talks, sample, {number}</keywords>
<talkid>{number}</talkid>
<title>{title}</title>
<description>{description}</description>
"""
XML_HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<{kind} setid="{stem}">\n'
XML_DOC = '<doc docid="{number}" genre="lectures">\n<title>Sample {number}</title>\n{segs}</doc>\n'


def build_sample_archive(path: str, n_train: int = 300, n_dev: int = 40, seed: int = 1) -> str:
    """Writes `path`, a `de-en.tgz` in the real archive's layout: `n_train` training pairs
    (`SAMPLE_RULE_PAIRS` first), `n_dev` segments per dev/test file (`SAMPLE_QUOTE_PAIR` first in
    dev2010), drawn with `seed`: the same arguments give the same bytes."""
    rng, files = random.Random(seed), {}
    train = list(SAMPLE_RULE_PAIRS)
    train += [sample_sentence_pair(rng) for _ in range(n_train - len(SAMPLE_RULE_PAIRS))]
    for side, lang in enumerate(LANGUAGES):
        titles, text = random.Random(f"{seed}/titles"), ""  # the same titles for both sides
        for talk, start in enumerate(range(0, len(train), SAMPLE_LINES_PER_TALK), 1):
            title, description = (sample_sentence_pair(titles)[side] for _ in range(2))
            text += TALK_HEADER.format(lang=lang, number=talk, title=title, description=description)
            text += "".join(p[side] + "\n" for p in train[start : start + SAMPLE_LINES_PER_TALK])
        files[f"{TRAIN_STEM}.{lang}"] = text
    for number, stem in enumerate(TEST_STEMS):
        stem_rng = random.Random(seed * 1000 + number)
        pairs = [sample_sentence_pair(stem_rng) for _ in range(n_dev)]
        pairs[:1] = [SAMPLE_QUOTE_PAIR] if number == 0 else pairs[:1]
        for side, (lang, kind) in enumerate(zip(LANGUAGES, ("srcset", "refset"))):
            text = XML_HEADER.format(kind=kind, stem=stem)
            for doc, start in enumerate(range(0, len(pairs), SAMPLE_SEGMENTS_PER_DOC), 1):
                segments = enumerate(pairs[start : start + SAMPLE_SEGMENTS_PER_DOC], start + 1)
                segs = "".join(f'<seg id="{n}"> {pair[side]} </seg>\n' for n, pair in segments)
                text += XML_DOC.format(number=doc, segs=segs)
            files[f"{stem}.{lang}.xml"] = text + f"</{kind}>\n</mteval>\n"
    with atomic_output(path) as temporary, open(temporary, "wb") as raw:  # fixed times, owners
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped:
            with tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:
                folder = tarfile.TarInfo(ARCHIVE_FOLDER)
                folder.type, folder.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(folder)
                for name in sorted(files):
                    data = files[name].encode("utf-8")
                    entry = tarfile.TarInfo(f"{ARCHIVE_FOLDER}/{name}")
                    entry.size, entry.mode = len(data), 0o644
                    tar.addfile(entry, io.BytesIO(data))
    return path
