"""The generated corpora of the kit: no download, the same bytes for the same arguments.

* The toy corpus (`write_corpus`, `binarize`): random "German" word sequences, each translated
  word by word into "English" and reversed; the tests' tiny Transformer and the README's quick
  start train on it in seconds.
* The sample archive (`build_sample_archive`): a `de-en.tgz` in the real IWSLT'14 layout
  (training files with their tag lines, the five dev/test XML files) of German sentences from a
  small lexicon and their word-by-word English, plus pairs that exercise the preparation's
  rules; the `tiny` preset prepares it as the real archive.
"""

import gzip
import io
import os
import random
import tarfile
from typing import Dict, List, Sequence, Tuple

from .errors import SettingError
from .files import atomic_output, write_lines
from .prepare import ARCHIVE_FOLDER, LANGUAGES, TEST_STEMS, TRAIN_STEM, fairseq_preprocess

SOURCE_LANG, TARGET_LANG = LANGUAGES
TOY_SPLITS = ("train", "valid", "test")
TOY_LEXICON = {f"de{i}": f"en{i}" for i in range(40)}


def toy_pairs(count: int, seed: int, min_len: int = 3, max_len: int = 12) -> List[Tuple[str, str]]:
    """`count` (source, target) pairs: target = source translated word by word, reversed."""
    rng, words, pairs = random.Random(seed), list(TOY_LEXICON), []
    for _ in range(count):
        source = [rng.choice(words) for _ in range(rng.randint(min_len, max_len))]
        pairs.append((" ".join(source), " ".join(TOY_LEXICON[w] for w in reversed(source))))
    return pairs


def write_corpus(
    folder: str,
    sizes: Dict[str, int],
    seed: int = 1,
    src: str = SOURCE_LANG,
    tgt: str = TARGET_LANG,
) -> str:
    """The toy corpus `{split}.{src}` / `{split}.{tgt}` in `folder` for every split of `sizes`
    (pairs per split); returns `folder`."""
    os.makedirs(folder, exist_ok=True)
    for offset, (split, count) in enumerate(sorted(sizes.items())):
        pairs = toy_pairs(count, seed * 1000 + offset)
        for side, lang in ((0, src), (1, tgt)):
            write_lines(os.path.join(folder, f"{split}.{lang}"), (pair[side] for pair in pairs))
    return folder


def binarize(
    text_folder: str, dest: str, src: str = SOURCE_LANG, tgt: str = TARGET_LANG, workers: int = 1
) -> str:
    """fairseq-preprocess of `write_corpus` output (the splits of TOY_SPLITS it has) into `dest`."""
    prefixes = {
        split: os.path.join(text_folder, split)
        for split in TOY_SPLITS
        if os.path.exists(os.path.join(text_folder, f"{split}.{src}"))
    }
    return fairseq_preprocess(prefixes, dest, src=src, tgt=tgt, workers=workers)


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
        lines += [pair[side] for pair in pairs[start : start + SAMPLE_LINES_PER_TALK]]
    return "".join(line + "\n" for line in lines)


def _sample_xml_file(stem: str, pairs: Sequence[Tuple[str, str]], side: int, lang: str) -> str:
    set_id = "iwslt2014_" + stem.split(".")[2]
    opening = (
        f'<srcset setid="{set_id}" srclang="german">'
        if lang == SOURCE_LANG
        else f'<refset setid="{set_id}" srclang="german" trglang="english" refid="ref">'
    )
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
        lines += [
            f'<seg id="{number}"> {pair[side]} </seg>'
            for number, pair in enumerate(pairs[start : start + SAMPLE_SEGMENTS_PER_DOC], start + 1)
        ]
        lines.append("</doc>")
    lines += ["</srcset>" if lang == SOURCE_LANG else "</refset>", "</mteval>"]
    return "".join(line + "\n" for line in lines)


def build_sample_archive(path: str, n_train: int = 300, n_dev: int = 40, seed: int = 1) -> str:
    """Writes a `de-en.tgz` in the real archive's layout (folder `de-en/`, the training files
    with their tag lines, the five dev/test XML files) holding `n_train` training pairs (the
    first ones are `SAMPLE_RULE_PAIRS`) and `n_dev` segments per dev/test file (the first
    dev2010 one is `SAMPLE_QUOTE_PAIR`), generated from a small lexicon with `seed`. The same
    arguments give the same bytes. Returns `path`."""
    if n_train < len(SAMPLE_RULE_PAIRS) or n_dev < 1:
        raise SettingError(
            f"build_sample_archive: n_train must be >= {len(SAMPLE_RULE_PAIRS)} and n_dev >= 1"
        )
    rng = random.Random(seed)
    train_pairs = list(SAMPLE_RULE_PAIRS) + [
        sample_sentence_pair(rng) for _ in range(n_train - len(SAMPLE_RULE_PAIRS))
    ]
    files = {}
    for side, lang in ((0, SOURCE_LANG), (1, TARGET_LANG)):
        files[f"{TRAIN_STEM}.{lang}"] = _sample_training_file(train_pairs, side, lang, seed)
    for number, stem in enumerate(TEST_STEMS):
        stem_rng = random.Random(seed * 1000 + number)
        pairs = [sample_sentence_pair(stem_rng) for _ in range(n_dev)]
        if number == 0:
            pairs[0] = SAMPLE_QUOTE_PAIR
        for side, lang in ((0, SOURCE_LANG), (1, TARGET_LANG)):
            files[f"{stem}.{lang}.xml"] = _sample_xml_file(stem, pairs, side, lang)
    _write_tgz(path, ARCHIVE_FOLDER, files)
    return path


def _write_tgz(path: str, folder: str, files: Dict[str, str]) -> None:
    """A reproducible .tgz (fixed times and owners) of `folder/` holding `files`, atomically."""
    with atomic_output(path) as temporary, open(temporary, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped:
            with tarfile.open(fileobj=zipped, mode="w", format=tarfile.GNU_FORMAT) as tar:
                folder_entry = tarfile.TarInfo(folder)
                folder_entry.type, folder_entry.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(folder_entry)
                for name in sorted(files):
                    data = files[name].encode("utf-8")
                    entry = tarfile.TarInfo(f"{folder}/{name}")
                    entry.size, entry.mode = len(data), 0o644
                    tar.addfile(entry, io.BytesIO(data))
