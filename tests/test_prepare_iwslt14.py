"""The IWSLT'14 de-en preparation (fairseq_asam_experiments/prepare.py) on generated archives in
the real layout, most on the session's `prepared_sample` (conftest).

Expected tokenizations are literal strings derived from the rules of Moses tokenizer.perl (and
checked against it once by hand); the tests do not need perl.
"""

import functools
import hashlib
import importlib.util
import io
import os
import tarfile

import pytest
from harness import SAMPLE_BPE_MERGES as MERGES
from harness import SAMPLE_N_DEV as N_DEV
from harness import SAMPLE_N_TRAIN as N_TRAIN

from fairseq_asam_experiments import prepare, synthetic_data
from fairseq_asam_experiments.errors import ExperimentError, SettingError
from fairseq_asam_experiments.prepare import (
    TRAIN_STEM,
    MosesPerlTokenizer,
    clean_corpus,
    perl_lowercase,
    prepare_iwslt14,
    segment_text,
    training_text,
)
from fairseq_asam_experiments.synthetic_data import SAMPLE_MAX_PAIR, build_sample_archive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_lines(path):
    """Lines as the recipe's tools see them: split at \\n only."""
    with open(path, encoding="utf-8", newline="\n") as f:
        text = f.read()
    return text.removesuffix("\n").split("\n") if text else []


# ---------------------------------------------------------------------------------------------
# Moses tokenizer.perl parity
# ---------------------------------------------------------------------------------------------

PERL_TOKENIZATIONS = [
    # tokenizer.perl splits the period off the last word of a line, abbreviation or not ...
    ("de", "Wir fahren in die U.S.A.", "Wir fahren in die U.S.A ."),
    ("de", "Ich kaufe Brot und t.", "Ich kaufe Brot und t ."),
    ("en", "We went to the U.S.A.", "We went to the U.S.A ."),
    ("en", "He is Mr.", "He is Mr ."),
    ("en", "Dr. Smith ... and t.", "Dr. Smith ... and t ."),
    # ... but keeps a final "..." whole, and abbreviations inside the line
    ("de", "Das ist es...", "Das ist es ..."),
    ("de", "Die U.S.A. sind groß.", "Die U.S.A. sind groß ."),
    ("de", "z.B. Hunde...", "z.B. Hunde ..."),
    ("en", "No. 5 is here. No. He is.", "No. 5 is here . No . He is ."),
    # letters, lowercase letters and numbers are perl's Unicode properties
    ("de", "Sie sagte 中国 ist groß.", "Sie sagte 中国 ist groß ."),
    ("de", "Er sagte Hallo. ბიჭი", "Er sagte Hallo. ბიჭი"),
    ("de", "नमस्ते", "नमस ् ते"),
    ("de", "〇,〇", "〇,〇"),
    # perl's whitespace: \x1c is deleted as a control character, a blank line is kept as it is
    ("de", "a\x1cb", "ab"),
    ("de", "\xa0", "\xa0"),
    ("de", "Hund\x85Katze", "Hund Katze"),
    # rules sacremoses already shared: escaping, apostrophes, commas, final .'
    (
        "de",
        'Der "Hund" & die <Katze> [sic] | ok',
        "Der &quot; Hund &quot; &amp; die &lt; Katze &gt; &#91; sic &#93; &#124; ok",
    ),
    ("de", "Wie geht's dem Hund?", "Wie geht &apos; s dem Hund ?"),
    ("de", "Er sagte 'geh.'", "Er sagte &apos; geh . &apos;"),
    ("de", "5,300 Hunde, 3 Katzen", "5,300 Hunde , 3 Katzen"),
    ("de", "Ca. 5 Hunde.", "Ca. 5 Hunde ."),
    ("en", "It's the 1990's, isn't it?", "It &apos;s the 1990 &apos;s , isn &apos;t it ?"),
    ("en", "He said 'go.'", "He said &apos; go . &apos; "),
    ("en", "The teacher\u2019s apple.", "The teacher \u2019 s apple ."),
    ("en", "rock'n'roll", "rock &apos;n&apos;roll"),
]


@pytest.mark.parametrize("lang, line, expected", PERL_TOKENIZATIONS)
def test_tokenizer_matches_tokenizer_perl(lang, line, expected):
    assert MosesPerlTokenizer(lang).tokenize_line(line) == expected


def test_lowercase_is_perls_lc():
    assert perl_lowercase("Der HUND ΟΔΟΣ İ") == "der hund οδοσ i\u0307"  # no final sigma


def test_text_extraction_rules():
    raw = [
        "<url>http://x</url>",
        "<keywords>talks</keywords>",
        "<talkid>7</talkid>",
        "<title>Ein Titel</title>",
        "<description>Eine Beschreibung</description>",
        "Text mit ’ <url>",
        "Text ’",
    ]
    assert training_text(raw) == ["Ein Titel", "Eine Beschreibung", "Text ’"]
    xml = [
        '<doc docid="1">',
        "<title>Titel</title>",
        '<seg id="12">  Hallo ’Welt’  </seg>  ',
        "</doc>",
    ]
    assert segment_text(xml) == ["Hallo 'Welt'"]
    # sed's \s in a UTF-8 locale takes the ideographic space but not the no-break space
    assert segment_text(['<seg id="1">\u3000</seg>', '<seg id="2">\xa0</seg>']) == ["", "\xa0"]


def test_clean_corpus_rules():
    long_word = "x" * 1001
    pairs = [
        ("a b", "a  b\tc"),  # ratio 1.5: kept, whitespace normalized
        ("a b", "a b c d"),  # ratio 2: dropped
        ("a b c", "a b"),  # ratio 1.5 the other way: kept
        (" ".join(["w"] * 175), " ".join(["w"] * 175)),  # 175 tokens: kept
        (" ".join(["w"] * 176), " ".join(["w"] * 176)),  # 176 tokens: dropped
        ("", "a"),  # empty: dropped
        (long_word, "y"),  # a token over 1000 characters: dropped
    ]
    kept = clean_corpus([p[0] for p in pairs], [p[1] for p in pairs])
    assert [index for index, _, _ in kept] == [0, 2, 3]
    assert kept[0] == (0, "a b", "a b c")


# ---------------------------------------------------------------------------------------------
# The recipe on the sample archive
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_archive(prepared_sample):
    return os.path.join(os.path.dirname(os.path.dirname(prepared_sample)), "de-en.tgz")


# prepare-iwslt14.sh's order of the test split (written out here, not taken from the code)
TEST_SETS_IN_ORDER = [
    "IWSLT14.TED.dev2010.de-en",
    "IWSLT14.TEDX.dev2012.de-en",
    "IWSLT14.TED.tst2010.de-en",
    "IWSLT14.TED.tst2011.de-en",
    "IWSLT14.TED.tst2012.de-en",
]


def text(folder, split, kind, lang):
    return read_lines(os.path.join(folder, f"{split}.{kind}.{lang}"))


def archive_text(archive, member):
    with tarfile.open(archive, "r:gz") as tar:
        return tar.extractfile(f"de-en/{member}").read().decode("utf-8")


@functools.lru_cache(maxsize=None)
def expected_cleaned(archive):
    """{lang: the cleaned, lowercased training text}, computed here from the recipe's parts."""
    texts = prepare.extract_texts(archive)
    tokenized = [
        list(map(MosesPerlTokenizer(lang).tokenize_line, texts[TRAIN_STEM, lang]))
        for lang in ("de", "en")
    ]
    kept = clean_corpus(*tokenized)
    return {
        lang: [perl_lowercase(pair[side]) for pair in kept] for side, lang in ((1, "de"), (2, "en"))
    }


def test_sample_archive_has_the_real_layout_and_stable_bytes(sample_archive, tmp_path):
    with tarfile.open(sample_archive, "r:gz") as tar:
        names = set(tar.getnames())
    expected = {f"de-en/{stem}.{lang}.xml" for stem in TEST_SETS_IN_ORDER for lang in ("de", "en")}
    assert names == expected | {"de-en", "de-en/train.tags.de-en.de", "de-en/train.tags.de-en.en"}
    train_de = archive_text(sample_archive, "train.tags.de-en.de")
    for tag in ("<url>", "<talkid>", "<keywords>", "<title>", "<description>"):
        assert tag in train_de
    assert '<seg id="1"> ' in archive_text(sample_archive, "IWSLT14.TED.tst2011.de-en.en.xml")
    again = build_sample_archive(str(tmp_path / "again.tgz"), n_train=N_TRAIN, n_dev=N_DEV)
    assert open(again, "rb").read() == open(sample_archive, "rb").read()
    other = build_sample_archive(str(tmp_path / "other.tgz"), n_train=N_TRAIN, n_dev=N_DEV, seed=2)
    assert open(other, "rb").read() != open(sample_archive, "rb").read()


def test_the_data_folder_is_named_by_the_archive_md5_and_merges(prepared_sample, sample_archive):
    md5 = hashlib.md5(open(sample_archive, "rb").read()).hexdigest()
    assert os.path.basename(prepared_sample) == f"iwslt14-de-en-{md5[:10]}-bpe{MERGES}"
    assert prepare.data_folder_name(sample_archive, 7) == f"iwslt14-de-en-{md5[:10]}-bpe7"


def test_training_tag_lines_dropped_and_tags_stripped(prepared_sample, sample_archive):
    raw = archive_text(sample_archive, "train.tags.de-en.en").splitlines()
    titles = [line[len("<title>") : -len("</title>")] for line in raw if line.startswith("<title>")]
    cleaned = text(prepared_sample, "train", "tok", "en") + text(
        prepared_sample, "valid", "tok", "en"
    )
    # text lines + title and description of each talk, less 3 dropped by the cleaning
    assert len(cleaned) == N_TRAIN + 2 * len(titles) - 3
    for tag in ("url", "talkid", "keywords", "title", "description"):
        assert not any(f"{tag} &gt;" in line or f"{tag}&gt;" in line for line in cleaned)
    assert perl_lowercase(MosesPerlTokenizer("en").tokenize_line(titles[0])) in cleaned


def test_right_single_quote_replaced_in_test_only(prepared_sample):
    assert text(prepared_sample, "test", "tok", "de")[0] == "wie geht &apos; s dem hund ?"
    assert text(prepared_sample, "test", "tok", "en")[0] == "how &apos;s the dog ?"
    assert text(prepared_sample, "test", "raw", "en")[0] == "how's the dog?"
    cleaned_en = text(prepared_sample, "train", "tok", "en") + text(
        prepared_sample, "valid", "tok", "en"
    )
    assert "the girl finds the teacher \u2019 s apple ." in cleaned_en


def test_cleaning_limits(prepared_sample):
    cleaned = {
        lang: text(prepared_sample, "train", "tok", lang)
        + text(prepared_sample, "valid", "tok", lang)
        for lang in ("de", "en")
    }
    assert SAMPLE_MAX_PAIR[0].lower() in cleaned["de"]  # 175 tokens
    assert SAMPLE_MAX_PAIR[1].lower() in cleaned["en"]
    assert (SAMPLE_MAX_PAIR[1] + " today").lower() not in cleaned["en"]  # 176 tokens
    assert "the old dog sleeps very often ." not in cleaned["en"]  # 4 : 7 tokens
    assert "the small cat sleeps today ." in cleaned["en"]  # 4 : 6 tokens, exactly 1.5
    assert "we drive to the u.s.a ." in cleaned["en"]
    assert "the bird sings ..." in cleaned["en"]
    assert "" not in cleaned["en"]
    for src, tgt in zip(cleaned["de"], cleaned["en"]):
        assert 1 / 1.5 <= len(src.split()) / len(tgt.split()) <= 1.5


def test_every_23rd_cleaned_pair_is_valid(prepared_sample, sample_archive):
    for lang in ("de", "en"):
        cleaned = expected_cleaned(sample_archive)[lang]
        assert text(prepared_sample, "valid", "tok", lang) == cleaned[22::23]
        train = [line for number, line in enumerate(cleaned, 1) if number % 23]
        assert text(prepared_sample, "train", "tok", lang) == train


def test_test_is_the_five_sets_in_order(prepared_sample, sample_archive):
    for lang in ("de", "en"):
        tokenizer = MosesPerlTokenizer(lang)
        expected, expected_raw = [], []
        for stem in TEST_SETS_IN_ORDER:
            segments = segment_text(archive_text(sample_archive, f"{stem}.{lang}.xml").splitlines())
            assert len(segments) == N_DEV
            expected += [perl_lowercase(tokenizer.tokenize_line(x)) for x in segments]
            expected_raw += [x.lower() for x in segments]
        assert text(prepared_sample, "test", "tok", lang) == expected
        assert text(prepared_sample, "test", "raw", lang) == expected_raw


def test_references_are_the_untokenized_target_side(prepared_sample, sample_archive):
    references = prepare.reference_files(prepared_sample)
    assert references == {
        s: os.path.join(prepared_sample, f"{s}.raw.en") for s in ("valid", "test")
    }
    for split, path in references.items():
        assert len(read_lines(path)) == len(text(prepared_sample, split, "tok", "en"))
    train_raw = text(prepared_sample, "train", "raw", "en") + text(
        prepared_sample, "valid", "raw", "en"
    )
    assert "we drive to the u.s.a." in train_raw  # untokenized, lowercased
    assert "the girl finds the teacher\u2019s apple." in train_raw  # ’ kept outside dev/test


def test_every_split_is_lowercased(prepared_sample, sample_archive):
    assert "Der Hund" in archive_text(sample_archive, "train.tags.de-en.de")  # a control
    for split in ("train", "valid", "test"):
        for kind in ("tok", "bpe", "raw"):
            for lang in ("de", "en"):
                lines = text(prepared_sample, split, kind, lang)
                assert lines and all(line == perl_lowercase(line) for line in lines)


def test_bpe_applied_to_every_split(prepared_sample):
    codes = read_lines(os.path.join(prepared_sample, "code"))
    assert codes[0].startswith("#version") and len(codes) == MERGES + 1
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            segmented = text(prepared_sample, split, "bpe", lang)
            assert any("@@ " in line for line in segmented)
            restored = [line.replace("@@ ", "") for line in segmented]
            assert restored == text(prepared_sample, split, "tok", lang)


def test_binarized_data_loads_in_fairseq(prepared_sample):
    from fairseq.data import Dictionary, data_utils

    data_bin = os.path.join(prepared_sample, prepare.DATA_BIN)
    for lang in ("de", "en"):
        dictionary = Dictionary.load(os.path.join(data_bin, f"dict.{lang}.txt"))
        for split in ("train", "valid", "test"):
            dataset = data_utils.load_indexed_dataset(
                os.path.join(data_bin, f"{split}.de-en.{lang}"), dictionary
            )
            lines = text(prepared_sample, split, "bpe", lang)
            assert len(dataset) == len(lines)
            assert list(dataset.sizes) == [len(line.split()) + 1 for line in lines]  # + </s>
        # the dictionaries are the training text's: every training line round-trips
        train = text(prepared_sample, "train", "bpe", lang)
        loaded = data_utils.load_indexed_dataset(
            os.path.join(data_bin, f"train.de-en.{lang}"), dictionary
        )
        assert [dictionary.string(loaded[i]) for i in range(len(train))] == train


# ---------------------------------------------------------------------------------------------
# The data folder: made once, whole or not at all
# ---------------------------------------------------------------------------------------------


def all_mtimes(folder):
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_an_existing_folder_is_returned_without_work(prepared_sample, sample_archive, tmp_path):
    root = os.path.dirname(prepared_sample)
    before = all_mtimes(root)
    assert prepare_iwslt14(sample_archive, root, MERGES) == prepared_sample
    assert all_mtimes(root) == before
    # any folder of that name counts as done: nothing is read or written
    name = prepare.data_folder_name(sample_archive, MERGES)
    (tmp_path / name).mkdir()
    assert prepare_iwslt14(sample_archive, str(tmp_path), MERGES) == str(tmp_path / name)
    assert [p.name for p in tmp_path.rglob("*")] == [name]


def test_a_failed_preparation_leaves_nothing(sample_archive, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise ExperimentError("fairseq-preprocess failed")

    monkeypatch.setattr(synthetic_data, "fairseq_preprocess", failing)
    with pytest.raises(ExperimentError, match="fairseq-preprocess failed"):
        prepare_iwslt14(sample_archive, str(tmp_path), MERGES)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_finished_meanwhile_by_another_process_is_kept(
    prepared_sample, sample_archive, tmp_path, monkeypatch
):
    """Two preparations of the same archive at once: the second to finish keeps the first's."""
    import shutil

    name = prepare.data_folder_name(sample_archive, MERGES)
    original = synthetic_data.fairseq_preprocess

    def racing(prefixes, dest, **kwargs):
        shutil.copytree(prepared_sample, tmp_path / name)  # the other process finishes first
        (tmp_path / name / "theirs").write_text("")
        return original(prefixes, dest, **kwargs)

    monkeypatch.setattr(synthetic_data, "fairseq_preprocess", racing)
    assert prepare_iwslt14(sample_archive, str(tmp_path), MERGES) == str(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary folder left
    assert (tmp_path / name / "theirs").exists()


# ---------------------------------------------------------------------------------------------
# Unusable archives
# ---------------------------------------------------------------------------------------------


def repack(source, destination, *, drop=None, edit=None):
    """`source` rewritten to `destination` without member `drop`, `edit(name, text)` applied."""
    with tarfile.open(source, "r:gz") as tar_in, tarfile.open(destination, "w:gz") as tar_out:
        for member in tar_in:
            if member.name == drop:
                continue
            if not member.isfile():
                tar_out.addfile(member)
                continue
            data = tar_in.extractfile(member).read()
            if edit is not None:
                data = edit(member.name, data.decode("utf-8")).encode("utf-8")
            member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data))
    return str(destination)


def truncated(source, destination):
    data = open(source, "rb").read()
    with open(destination, "wb") as out:
        out.write(data[: len(data) // 2])
    return str(destination)


def not_gzip(source, destination):
    with open(destination, "wb") as out:
        out.write(b"<html>Not found</html>\n" * 10)
    return str(destination)


def one_segment_fewer(name, text):
    if name.endswith("tst2011.de-en.de.xml"):
        return text.replace('<seg id="2">', '<nonseg id="2">', 1)
    return text


BAD_ARCHIVES = [
    ("truncated", truncated, "corrupt or truncated archive"),
    ("not_gzip", not_gzip, "corrupt or truncated archive"),
    (
        "missing_member",
        lambda src, dst: repack(src, dst, drop="de-en/IWSLT14.TED.tst2012.de-en.en.xml"),
        "missing member de-en/IWSLT14.TED.tst2012.de-en.en.xml",
    ),
    (
        "mismatched_lines",
        lambda src, dst: repack(src, dst, edit=one_segment_fewer),
        f"de-en/IWSLT14.TED.tst2011.de-en.de.xml has {N_DEV - 1} text lines "
        f"but de-en/IWSLT14.TED.tst2011.de-en.en.xml has {N_DEV}",
    ),
]


@pytest.mark.parametrize(
    "kind, make, message", BAD_ARCHIVES, ids=[case[0] for case in BAD_ARCHIVES]
)
def test_unusable_archive_fails_before_writing(sample_archive, tmp_path, kind, make, message):
    bad = make(sample_archive, tmp_path / f"{kind}.tgz")
    root = tmp_path / "data"
    with pytest.raises(ExperimentError) as failure:
        prepare_iwslt14(bad, str(root), MERGES)
    message_text = str(failure.value)
    assert message in message_text and bad in message_text and "\n" not in message_text
    assert not root.exists()


def test_missing_archive_fails(tmp_path):
    with pytest.raises(ExperimentError, match="nowhere.tgz: archive not found"):
        prepare_iwslt14(str(tmp_path / "nowhere.tgz"), str(tmp_path))


def test_real_counts_are_checked_before_anything_is_written(sample_archive, tmp_path, monkeypatch):
    """The split sizes are checked on the archive of the mirror's MD5 (here: the sample's)."""
    monkeypatch.setattr(prepare, "ARCHIVE_MD5", prepare.file_md5(sample_archive))
    with pytest.raises(ExperimentError, match="train 313, valid 14, test 60 differ .*160,239"):
        prepare_iwslt14(sample_archive, str(tmp_path / "data"), MERGES)
    assert not (tmp_path / "data").exists()


def test_bad_flags_name_the_flag_before_any_work(sample_archive, tmp_path):
    with pytest.raises(SettingError, match="--bpe-merges: must be positive, not 0"):
        prepare_iwslt14(sample_archive, str(tmp_path), bpe_merges=0)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# fairseq-asam-prepare
# ---------------------------------------------------------------------------------------------


def test_cli_reports_an_unusable_archive_in_one_line(sample_archive, tmp_path, capsys):
    bad = truncated(sample_archive, tmp_path / "bad.tgz")
    assert prepare.main(["--archive", bad, "--data-root", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fairseq-asam-prepare: error: ") and bad in err


def test_cli_prepares_a_sample(tmp_path, capsys):
    argv = ["--sample", "--data-root", str(tmp_path), "--bpe-merges", "100"]
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    archive = str(tmp_path / prepare.SAMPLE_ARCHIVE_NAME)
    folder = tmp_path / prepare.data_folder_name(archive, 100)
    assert out.strip().splitlines()[-1] == str(folder / "data-bin")
    assert "train 313, valid 14, test 200" in out  # the sample's default 40 segments per set
    assert (folder / "data-bin" / "train.de-en.de.bin").exists()


# ---------------------------------------------------------------------------------------------
# Parity with tokenizer.perl itself: opt-in, it needs perl and a Moses checkout
# ---------------------------------------------------------------------------------------------

MOSES_DIR = os.environ.get("FAIRSEQ_ASAM_MOSES_DIR")
PARITY_ARCHIVE = os.environ.get("FAIRSEQ_ASAM_IWSLT14_ARCHIVE")  # the real de-en.tgz, optional


def parity_script():
    path = os.path.join(REPO, "scripts", "tokenizer_parity.py")
    spec = importlib.util.spec_from_file_location("tokenizer_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not MOSES_DIR, reason="opt-in: FAIRSEQ_ASAM_MOSES_DIR=<a Moses checkout>")
def test_expected_tokenizations_are_tokenizer_perls():
    for lang, line, expected in PERL_TOKENIZATIONS:
        assert parity_script().tokenizer_perl(MOSES_DIR, lang, [line]) == [expected], (lang, line)


@pytest.mark.skipif(not MOSES_DIR, reason="opt-in: FAIRSEQ_ASAM_MOSES_DIR=<a Moses checkout>")
def test_no_line_of_the_archive_differs_from_tokenizer_perl(sample_archive):
    """Every text line the recipe tokenizes (FAIRSEQ_ASAM_IWSLT14_ARCHIVE, else the sample)."""
    results = parity_script().tokenizer_parity(MOSES_DIR, PARITY_ARCHIVE or sample_archive)
    assert {lang: result[1] for lang, result in results.items()} == {"de": 0, "en": 0}, results
