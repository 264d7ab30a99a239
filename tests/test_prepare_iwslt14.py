"""The IWSLT'14 de-en preparation (experiments/prepare.py) on generated archives in the real layout.

Expected tokenizations are literal strings derived from the rules of Moses tokenizer.perl (and
checked against it once by hand); the tests do not need perl.
"""

import io
import os
import subprocess
import sys
import tarfile

import pytest

from fairseq_asam_experiments import files, prepare, synthetic_data
from fairseq_asam_experiments.errors import ExperimentError, SettingError
from fairseq_asam_experiments.prepare import (
    TEST_STEMS,
    TRAIN_STEM,
    MosesPerlTokenizer,
    clean_corpus,
    perl_lowercase,
    prepare_iwslt14,
    read_lines,
    segment_text,
    training_text,
)
from fairseq_asam_experiments.synthetic_data import SAMPLE_MAX_PAIR, build_sample_archive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "scripts", "prepare_iwslt14.py")
N_TRAIN, N_DEV, MERGES = 300, 12, 200


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
# The recipe on a sample archive
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_archive(tmp_path_factory):
    return build_sample_archive(
        str(tmp_path_factory.mktemp("archive") / "de-en.tgz"), n_train=N_TRAIN, n_dev=N_DEV
    )


@pytest.fixture(scope="module")
def prepared(sample_archive, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("work"))
    data_bin = prepare_iwslt14(sample_archive, workdir, bpe_merges=MERGES, workers=2)
    return workdir, data_bin


def tmp_file(workdir, name):
    return os.path.join(workdir, "iwslt14.tokenized.de-en", "tmp", name)


def archive_text(archive, member):
    with tarfile.open(archive, "r:gz") as tar:
        return tar.extractfile(f"de-en/{member}").read().decode("utf-8")


def test_sample_archive_has_the_real_layout(sample_archive, tmp_path):
    with tarfile.open(sample_archive, "r:gz") as tar:
        names = set(tar.getnames())
    assert set(prepare.archive_members()) | {"de-en"} == names
    train_de = archive_text(sample_archive, "train.tags.de-en.de")
    for tag in ("<url>", "<talkid>", "<keywords>", "<title>", "<description>"):
        assert tag in train_de
    assert '<seg id="1"> ' in archive_text(sample_archive, "IWSLT14.TED.tst2011.de-en.en.xml")
    again = build_sample_archive(str(tmp_path / "again.tgz"), n_train=N_TRAIN, n_dev=N_DEV)
    assert open(again, "rb").read() == open(sample_archive, "rb").read()


def test_training_tag_lines_dropped_and_tags_stripped(prepared, sample_archive):
    workdir, _ = prepared
    raw = archive_text(sample_archive, "train.tags.de-en.en").splitlines()
    titles = [line[len("<title>") : -len("</title>")] for line in raw if line.startswith("<title>")]
    talks = len(titles)
    tokenized = read_lines(tmp_file(workdir, f"{TRAIN_STEM}.tok.en"))
    assert len(tokenized) == N_TRAIN + 2 * talks  # text lines + title and description of each talk
    for tag in ("url", "talkid", "keywords", "title", "description"):
        assert not any(f"{tag} &gt;" in line for line in tokenized)
    tokenizer = MosesPerlTokenizer("en")
    assert tokenizer.tokenize_line(titles[0]) in tokenized


def test_right_single_quote_replaced_in_test_only(prepared):
    workdir, _ = prepared
    assert read_lines(tmp_file(workdir, "test.de"))[0] == "wie geht &apos; s dem hund ?"
    assert read_lines(tmp_file(workdir, "test.en"))[0] == "how &apos;s the dog ?"
    cleaned_en = read_lines(tmp_file(workdir, f"{TRAIN_STEM}.en"))
    assert "the girl finds the teacher \u2019 s apple ." in cleaned_en


def test_cleaning_limits(prepared):
    workdir, _ = prepared
    cleaned = {lang: read_lines(tmp_file(workdir, f"{TRAIN_STEM}.{lang}")) for lang in ("de", "en")}
    talks = -(
        -N_TRAIN // synthetic_data.SAMPLE_LINES_PER_TALK
    )  # each has a title and a description line
    assert (
        len(cleaned["de"]) == len(cleaned["en"]) == N_TRAIN + 2 * talks - 3
    )  # 176 tokens, ratio 1.75, empty
    assert SAMPLE_MAX_PAIR[0].lower() in cleaned["de"]  # 175 tokens
    assert SAMPLE_MAX_PAIR[1].lower() in cleaned["en"]
    assert all(len(line.split()) <= 175 for lang in cleaned for line in cleaned[lang])
    assert "the old dog sleeps very often ." not in cleaned["en"]  # 4 : 7 tokens
    assert "the small cat sleeps today ." in cleaned["en"]  # 4 : 6 tokens, exactly 1.5
    assert "we drive to the u.s.a ." in cleaned["en"]
    assert "the bird sings ..." in cleaned["en"]
    assert "" not in cleaned["en"]
    for src, tgt in zip(cleaned["de"], cleaned["en"]):
        ratio = len(src.split()) / len(tgt.split())
        assert 1 / 1.5 <= ratio <= 1.5


def test_every_23rd_line_is_valid(prepared):
    workdir, _ = prepared
    for lang in ("de", "en"):
        cleaned = read_lines(tmp_file(workdir, f"{TRAIN_STEM}.{lang}"))
        valid = read_lines(tmp_file(workdir, f"valid.{lang}"))
        train = read_lines(tmp_file(workdir, f"train.{lang}"))
        assert valid == cleaned[22::23]
        assert train == [line for number, line in enumerate(cleaned, 1) if number % 23]
        assert len(train) + len(valid) == len(cleaned)


def test_test_is_the_five_sets_in_order(prepared, sample_archive):
    workdir, _ = prepared
    for lang in ("de", "en"):
        test = read_lines(tmp_file(workdir, f"test.{lang}"))
        test_raw = read_lines(tmp_file(workdir, f"test.raw.{lang}"))
        assert len(test) == len(test_raw) == 5 * N_DEV
        blocks = [read_lines(tmp_file(workdir, f"{stem}.{lang}")) for stem in TEST_STEMS]
        assert test == [line for block in blocks for line in block]
        for number, stem in enumerate(TEST_STEMS):
            xml = archive_text(sample_archive, f"{stem}.{lang}.xml")
            first_segment = segment_text(xml.splitlines())[0]
            assert test_raw[number * N_DEV] == first_segment.lower()


def test_every_split_is_lowercased(prepared):
    workdir, _ = prepared
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            lines = read_lines(tmp_file(workdir, f"{split}.{lang}"))
            assert lines and all(line == perl_lowercase(line) for line in lines)


def test_bpe_applied_to_every_split(prepared):
    workdir, _ = prepared
    prep = os.path.join(workdir, "iwslt14.tokenized.de-en")
    codes = read_lines(os.path.join(prep, "code"))
    assert codes[0].startswith("#version") and len(codes) <= MERGES + 1
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            segmented = read_lines(os.path.join(prep, f"{split}.{lang}"))
            assert any("@@ " in line for line in segmented)
            restored = [line.replace("@@ ", "") for line in segmented]
            assert restored == read_lines(tmp_file(workdir, f"{split}.{lang}"))


def test_binarized_data_loads_in_fairseq(prepared):
    from fairseq.data import Dictionary, data_utils

    workdir, data_bin = prepared
    assert data_bin == os.path.join(workdir, "data-bin", "iwslt14.tokenized.de-en")
    prep = os.path.join(workdir, "iwslt14.tokenized.de-en")
    for lang in ("de", "en"):
        dictionary = Dictionary.load(os.path.join(data_bin, f"dict.{lang}.txt"))
        for split in ("train", "valid", "test"):
            dataset = data_utils.load_indexed_dataset(
                os.path.join(data_bin, f"{split}.de-en.{lang}"), dictionary
            )
            lines = read_lines(os.path.join(prep, f"{split}.{lang}"))
            assert len(dataset) == len(lines)
            assert list(dataset.sizes) == [len(line.split()) + 1 for line in lines]  # + </s>


def all_mtimes(folder):
    return {
        os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(folder)
        for name in names
    }


def test_rerun_skips_finished_steps(prepared, sample_archive):
    workdir, data_bin = prepared
    before = all_mtimes(workdir)
    assert prepare_iwslt14(sample_archive, workdir, bpe_merges=MERGES, workers=2) == data_bin
    assert all_mtimes(workdir) == before


def test_rerun_redoes_a_step_with_a_missing_file_or_new_settings(sample_archive, tmp_path):
    workdir = str(tmp_path)
    prepare_iwslt14(sample_archive, workdir, bpe_merges=MERGES, workers=1)
    prep = os.path.join(workdir, "iwslt14.tokenized.de-en")
    train_en = os.path.join(prep, "train.en")
    expected = read_lines(train_en)
    os.remove(train_en)
    with open(files.temporary_name(train_en), "w") as half_written:  # an interrupted write
        half_written.write("half a li")
    tokenized = tmp_file(workdir, f"{TRAIN_STEM}.tok.de")
    tokenized_mtime = os.stat(tokenized).st_mtime_ns
    prepare_iwslt14(sample_archive, workdir, bpe_merges=MERGES, workers=1)
    assert read_lines(train_en) == expected
    assert os.stat(tokenized).st_mtime_ns == tokenized_mtime
    prepare_iwslt14(sample_archive, workdir, bpe_merges=MERGES // 2, workers=1)
    assert len(read_lines(os.path.join(prep, "code"))) <= MERGES // 2 + 1
    assert os.stat(tokenized).st_mtime_ns == tokenized_mtime


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
    workdir = tmp_path / "work"
    with pytest.raises(ExperimentError) as failure:
        prepare_iwslt14(bad, str(workdir), bpe_merges=MERGES, workers=1)
    text = str(failure.value)
    assert message in text and bad in text and "\n" not in text
    assert not workdir.exists() or not any(path.is_file() for path in workdir.rglob("*"))


def test_missing_archive_fails(tmp_path):
    with pytest.raises(ExperimentError, match="nowhere.tgz: archive not found"):
        prepare_iwslt14(str(tmp_path / "nowhere.tgz"), str(tmp_path), workers=1)


def test_real_counts_are_checked_before_the_splits_are_written(sample_archive, tmp_path):
    with pytest.raises(ExperimentError, match="160,239.*--no-expect-real-counts"):
        prepare_iwslt14(
            sample_archive, str(tmp_path), bpe_merges=MERGES, workers=1, expect_real_counts=True
        )
    assert not os.path.exists(tmp_file(str(tmp_path), "train.de"))


def test_cli_reports_an_unusable_archive_in_one_line(sample_archive, tmp_path):
    bad = truncated(sample_archive, tmp_path / "bad.tgz")
    run = subprocess.run(
        [sys.executable, CLI, "--archive", bad, "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("fairseq-asam-prepare: error: ") and bad in run.stderr


def test_cli_prepares_a_sample(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            CLI,
            "--sample",
            "--workdir",
            str(tmp_path),
            "--bpe-merges",
            "100",
            "--workers",
            "1",
            "--joined-dictionary",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    data_bin = os.path.join(str(tmp_path), "data-bin", "iwslt14.tokenized.de-en")
    assert run.stdout.strip().splitlines()[-1] == data_bin
    assert "train 313, valid 14, test 200" in run.stdout
    assert os.path.exists(os.path.join(data_bin, "train.de-en.de.bin"))
    dict_de = read_lines(os.path.join(data_bin, "dict.de.txt"))  # --joined-dictionary
    assert dict_de == read_lines(os.path.join(data_bin, "dict.en.txt")) and len(dict_de) > 20


def test_bad_flags_name_the_flag_before_any_work(sample_archive, tmp_path):
    with pytest.raises(SettingError, match="--bpe-merges: must be positive, not 0"):
        prepare_iwslt14(sample_archive, str(tmp_path), bpe_merges=0, workers=1)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Parity with tokenizer.perl itself: opt-in, it needs perl and a Moses checkout
# ---------------------------------------------------------------------------------------------

MOSES_DIR = os.environ.get("FAIRSEQ_ASAM_MOSES_DIR")
PARITY_ARCHIVE = os.environ.get("FAIRSEQ_ASAM_IWSLT14_ARCHIVE")  # the real de-en.tgz, optional


@pytest.mark.skipif(not MOSES_DIR, reason="opt-in: FAIRSEQ_ASAM_MOSES_DIR=<a Moses checkout>")
def test_expected_tokenizations_are_tokenizer_perls():
    for lang, line, expected in PERL_TOKENIZATIONS:
        assert prepare.tokenizer_perl(MOSES_DIR, lang, [line]) == [expected], (lang, line)


@pytest.mark.skipif(not MOSES_DIR, reason="opt-in: FAIRSEQ_ASAM_MOSES_DIR=<a Moses checkout>")
def test_no_line_of_the_archive_differs_from_tokenizer_perl(sample_archive):
    """Every text line the recipe tokenizes (FAIRSEQ_ASAM_IWSLT14_ARCHIVE, else the sample)."""
    results = prepare.tokenizer_parity(
        MOSES_DIR, prepare.extract_texts(PARITY_ARCHIVE or sample_archive)
    )
    assert [r.ours_differ for r in results] == [0, 0], prepare.format_parity(results)
