"""A small generated parallel corpus, for tests and the CPU `tiny` preset.

The "German" side is a random word sequence; the "English" side translates it word by word
through a fixed dictionary and reverses the order, so a Transformer can learn it in minutes.
"""
import os
import random
from typing import Dict, List, Tuple

SOURCE_WORDS = [f"de{i}" for i in range(40)]
TARGET_WORDS = [f"en{i}" for i in range(40)]


def make_pairs(count: int, seed: int, min_len: int = 3, max_len: int = 12) -> List[Tuple[str, str]]:
    rng = random.Random(seed)
    lexicon = dict(zip(SOURCE_WORDS, TARGET_WORDS))
    pairs = []
    for _ in range(count):
        words = [rng.choice(SOURCE_WORDS) for _ in range(rng.randint(min_len, max_len))]
        pairs.append((" ".join(words), " ".join(lexicon[w] for w in reversed(words))))
    return pairs


def write_corpus(folder: str, sizes: Dict[str, int], seed: int = 1, src: str = "de", tgt: str = "en") -> str:
    """Writes `{split}.{src}` / `{split}.{tgt}` for every split in `sizes`; returns `folder`."""
    os.makedirs(folder, exist_ok=True)
    for offset, (split, count) in enumerate(sorted(sizes.items())):
        pairs = make_pairs(count, seed * 1000 + offset)
        for side, lang in ((0, src), (1, tgt)):
            with open(os.path.join(folder, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(pair[side] + "\n" for pair in pairs)
    return folder


def binarize(text_folder: str, dest: str, src: str = "de", tgt: str = "en", workers: int = 1) -> str:
    """fairseq-preprocess of `write_corpus` output (splits train/valid/test) into `dest`."""
    from fairseq import options
    from fairseq_cli import preprocess

    splits = [s for s in ("train", "valid", "test") if os.path.exists(os.path.join(text_folder, f"{s}.{src}"))]
    argv = ["--source-lang", src, "--target-lang", tgt, "--destdir", dest, "--workers", str(workers)]
    for split in splits:
        argv += [f"--{split}pref", os.path.join(text_folder, split)]
    args = options.get_preprocessing_parser().parse_args(argv)
    preprocess.main(args)
    return dest
