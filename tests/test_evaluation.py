"""experiments.evaluation: the two BLEU scores, the parsing of fairseq-generate, checkpoints."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import sacrebleu
import torch

import fairseq_asam
from fairseq_asam_experiments import evaluation, synthetic_data
from fairseq_asam_experiments.errors import ExperimentError, SettingError

# A small tokenized, lowercased corpus: every n-gram order has matches, the system is short
# (brevity penalty < 1), one reference word is unknown to the model.
HYPOTHESES = [
    "the cat sat on the mat .",
    "there is a dog in the garden",
    "we have seen this before , have n't we ?",
    "it 's a small world .",
]
REFERENCES = [
    "the cat sat on the red mat .",
    "there is a big dog in the garden .",
    "we have seen this film before , have n't we ?",
    "it 's a small world after all .",
]
# 100 * (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = 100 * 3 ** -0.25
ONE_WORD_OFF = ("a b c d e f", "a b c d e g", 75.98356856515925)


def test_tokenized_bleu_closed_form():
    hypothesis, reference, expected = ONE_WORD_OFF
    score, details = evaluation.tokenized_bleu([hypothesis], [reference])
    assert score == pytest.approx(expected, abs=1e-9)
    assert details.startswith("BLEU4 = 75.98, 83.3/80.0/75.0/66.7 (BP=1.000")
    assert evaluation.tokenized_bleu([reference], [reference])[0] == pytest.approx(100.0)


def test_tokenized_bleu_agrees_with_sacrebleu_on_tokenized_text():
    score, details = evaluation.tokenized_bleu(HYPOTHESES, REFERENCES)
    # sacreBLEU without its tokenizer and smoothing computes the same corpus BLEU-4.
    reference_score = sacrebleu.corpus_bleu(
        HYPOTHESES, [REFERENCES], tokenize="none", smooth_method="none", force=True
    )
    assert score == pytest.approx(reference_score.score, abs=1e-9)
    assert "BP=0.819, ratio=0.833, syslen=30, reflen=36" in details  # exp(1 - 36/30)


def test_tokenized_bleu_agrees_with_fairseq_score(tmp_path, monkeypatch, capsys):
    from fairseq_cli import score

    system, reference = tmp_path / "sys.txt", tmp_path / "ref.txt"
    system.write_text("\n".join(HYPOTHESES) + "\n")
    reference.write_text("\n".join(REFERENCES) + "\n")
    monkeypatch.setattr(
        sys, "argv", ["fairseq-score", "--sys", str(system), "--ref", str(reference)]
    )
    score.cli_main()
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == evaluation.tokenized_bleu(HYPOTHESES, REFERENCES)[1]


def test_unknown_reference_word_never_matches():
    """fairseq-generate writes an unknown word as <<unk>> in the reference (T-) and as <unk> in the
    hypothesis (H-): the two never match, so this pair is one word off."""
    hypothesis, reference, expected = ONE_WORD_OFF
    assert evaluation.tokenized_bleu(["a b c d e <unk>"], ["a b c d e <<unk>>"])[
        0
    ] == pytest.approx(expected, abs=1e-9)


# Not a multiple of fairseq's --required-batch-size-multiple (8): a batch of 8 and one of 2.
TEST_SENTENCES = 10


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluate_checkpoint of a run's checkpoint_last.pt on a test split with a word the training
    dictionary lacks in every other sentence, fairseq-generate run for real with
    --score-reference (the reference as hypothesis: tokenized BLEU < 100 only through <unk>).
    Returns (its result, the raw references it scored sacreBLEU against)."""
    from harness import build_trainer

    root = tmp_path_factory.mktemp("evaluated")
    text = synthetic_data.write_corpus(
        str(root / "text"), {"train": 120, "valid": 24, "test": TEST_SENTENCES}
    )
    for lang, word in (("de", "unbekannt"), ("en", "unknown")):
        path = root / "text" / f"test.{lang}"
        lines = path.read_text().splitlines()
        path.write_text(
            "".join(
                f"{line} {word}\n" if i % 2 == 0 else f"{line}\n" for i, line in enumerate(lines)
            )
        )
    data_bin = synthetic_data.binarize(text, str(root / "data-bin"))
    save_dir = root / "run" / "checkpoints"
    trainer = build_trainer(data_bin, ["--optimizer", "adam", "--save-dir", str(save_dir)])
    trainer.consolidate_optimizer()
    save_dir.mkdir(parents=True)
    trainer.save_checkpoint(str(save_dir / "checkpoint_last.pt"), {})
    raw = root / "test.raw.en"  # the tokenized text: not what the detokenized hypotheses are
    raw_lines = (root / "text" / "test.en").read_text().splitlines()
    raw.write_text("\n".join(raw_lines) + "\n")
    generate = evaluation.generate_command
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            evaluation,
            "generate_command",
            lambda *args: (
                generate(*args) + ["--score-reference", "--cpu", "--beam", "1", "--batch-size", "8"]
            ),
        )
        last = evaluation.parse_checkpoint_choice("last")
        results = evaluation.evaluate_checkpoint(
            data_bin, str(save_dir), fairseq_asam.USER_DIR, last, {"test": str(raw)}
        )
    return results, raw_lines


@pytest.mark.slow
def test_tokenized_bleu_is_fairseq_generates_with_unknown_words(evaluated):
    with open(evaluated[0]["test"]["output"], encoding="utf-8") as f:
        text = f.read()
    output = evaluation.parse_generate_output(text)
    assert output.ids == list(range(TEST_SENTENCES))  # every sentence, none left out by batching
    assert sum("<<unk>>" in reference for reference in output.references) == TEST_SENTENCES // 2
    assert (
        sum("<unk>" in hypothesis.split() for hypothesis in output.hypotheses)
        == TEST_SENTENCES // 2
    )
    # its last line: "Generate test with beam=1: BLEU4 = 34.86, 68.1/42.8/... (BP=...)"
    printed, bleu = re.search(r"^Generate .*: (BLEU4 = ([0-9.]+),.*)$", text, re.M).groups()
    assert float(bleu) < 100
    scores = evaluation.score_split(output)
    assert scores["bleu"] == pytest.approx(float(bleu), abs=0.0051)  # printed: 2 decimals
    assert scores["bleu_details"] == printed


@pytest.mark.slow
def test_evaluate_checkpoint_end_to_end(evaluated):
    """The result's keys are results.json's; its scores are those computed here by sacreBLEU."""
    from harness import independent_scores

    results, raw_lines = evaluated
    assert set(results) == {"protocol", "checkpoint", "valid", "test"}
    assert results["protocol"] == "last"
    checkpoint = results["checkpoint"]
    assert checkpoint["path"].endswith("checkpoints/checkpoint_last.pt")
    assert checkpoint["sources"] == [checkpoint["path"]] and checkpoint["selected_by"] is None
    assert checkpoint["num_updates"] == 0  # saved before any update
    test = results["test"]
    assert (
        test["output"].endswith("run/generate-test.txt") and "--gen-subset test" in test["command"]
    )
    bleu, sacre, sentences = independent_scores(test["output"], raw_lines)
    # Both fp64 corpus statistics; the kit rounds to 4 decimals.
    assert test["bleu"] == pytest.approx(bleu, abs=5e-5) and test["sentences"] == sentences
    assert test["sacrebleu"] == pytest.approx(sacre, abs=5e-5) and sacre < 100
    assert "assumed" in test["bleu_metric"]


@pytest.mark.slow
def test_each_split_is_what_its_fairseq_generate_command_prints(evaluated):
    """Both splits were generated in one process (generate_each); the second split's file is,
    line for line, what its recorded command prints when run on its own."""
    test = evaluated[0]["test"]
    alone = subprocess.run(
        shlex.split(test["command"]), capture_output=True, text=True, timeout=300
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    with open(test["output"], encoding="utf-8") as f:
        assert f.read() == alone.stdout
    assert re.search(r"^H-\d+\t", alone.stdout, re.M)  # not two empty outputs


GENERATE_JOBS = [("valid", "V-text\n"), ("test", "T-text\n")]


def generate_jobs(folder):
    return [
        ([sys.executable, "-m", "fairseq_cli.generate", split], str(folder / f"{split}.txt"))
        for split, _ in GENERATE_JOBS
    ]


def test_run_generate_starts_one_child_for_every_split(tmp_path):
    """The child (here a stand-in `call`) gets every split's command and temporary file; each
    file becomes its split's output once the child succeeds."""
    calls = []

    def child(command, stdout, env=None):
        calls.append(command)
        for (_, temporary), (_, text) in zip(json.loads(command[-1]), GENERATE_JOBS):
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(text)
        return 0

    jobs = generate_jobs(tmp_path)
    texts = evaluation.run_generate(jobs, str(tmp_path / "generate.log"), call=child)
    assert texts == [text for _, text in GENERATE_JOBS]
    (command,) = calls
    assert command[:3] == [sys.executable, "-m", "fairseq_asam_experiments.evaluation"]
    assert [c for c, _ in json.loads(command[-1])] == [c for c, _ in jobs]
    for (_, path), (_, text) in zip(jobs, GENERATE_JOBS):
        assert open(path, encoding="utf-8").read() == text
    assert sorted(os.listdir(tmp_path)) == ["generate.log", "test.txt", "valid.txt"]


def test_a_killed_child_is_named_and_a_foreign_command_refused(tmp_path):
    def killed(command, stdout, env=None):
        return -9  # subprocess's status of a child killed by SIGKILL

    with pytest.raises(
        ExperimentError, match=re.escape("fairseq-generate failed (killed by SIGKILL)")
    ):
        evaluation.run_generate(
            generate_jobs(tmp_path), str(tmp_path / "generate.log"), call=killed
        )
    foreign = [([sys.executable, "-m", "fairseq_cli.train", "data"], str(tmp_path / "x.txt"))]
    with pytest.raises(
        ExperimentError, match="not a fairseq-generate command: .* fairseq_cli.train"
    ):
        evaluation.generate_each(foreign)
    assert not (tmp_path / "x.txt").exists()


def test_a_failed_generation_names_its_log_and_writes_no_output(tmp_path):
    def failing(command, stdout, env=None):  # writes the valid split, then fails
        with open(json.loads(command[-1])[0][1], "w") as f:
            f.write("H-0\t-1.0\tx\n")
        stdout.write("Traceback: no test split\n")
        return 1

    log = tmp_path / "generate.log"
    with pytest.raises(ExperimentError, match=re.escape(f"(exit status 1); see {log}")):
        evaluation.run_generate(generate_jobs(tmp_path), str(log), call=failing)
    assert log.read_text() == "Traceback: no test split\n"
    assert sorted(os.listdir(tmp_path)) == ["generate.log"]  # no split's file, no temporary


def test_detokenized_sacrebleu_on_moses_detokenized_text():
    # Moses' English detokenizer rejoins "'s" but, like detokenizer.perl, not "n't".
    assert evaluation.moses_detokenize(["it 's a test , is n't it ?"]) == [
        "it's a test, is n't it?"
    ]
    hypotheses, references = (
        evaluation.moses_detokenize(HYPOTHESES),
        evaluation.moses_detokenize(REFERENCES),
    )
    score, signature = evaluation.detokenized_sacrebleu(hypotheses, references)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    # Both sides of IWSLT'14 are lowercased, and the signature says so.
    assert signature == f"nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    cased = evaluation.detokenized_sacrebleu(["The Cat sat."], ["the cat sat."])[0]
    assert cased == pytest.approx(100.0)  # case-insensitive...
    assert (
        sacrebleu.corpus_bleu(["The Cat sat."], [["the cat sat."]]).score < 100
    )  # ...unlike the default
    assert evaluation.detokenized_sacrebleu(["The cat sat."], ["The cat sat."])[0] == pytest.approx(
        100.0
    )


GENERATE_OUTPUT = """\
2026-01-01 00:00:00 | INFO | fairseq_cli.generate | loading model(s) from checkpoint_best.pt
S-1\tes ist eine kleine welt .
T-1\tit 's a small world after all .
H-1\t-0.52\tit 's a small world .
D-1\t-0.52\tit 's a small world .
P-1\t-0.1 -0.2 -0.3 -0.4 -0.5 -0.6 -0.7
H-1\t-0.91\tit 's a big world .
S-0\tdie katze saß auf der matte .
T-0\tthe cat sat on the red mat .
H-0\t-0.33\tthe cat sat on the mat .
D-0\t-0.33\tthe cat sat on the mat .
P-0\t-0.1 -0.2 -0.3 -0.4 -0.5 -0.6 -0.7 -0.8
S-2\tleer
T-2\t
H-2\t-1.0\t
Generate test with beam=5: {bleu}
"""


def generate_text(bleu_line: str) -> str:
    return GENERATE_OUTPUT.format(bleu=bleu_line)


def test_parse_generate_output_orders_by_id_and_keeps_the_best_hypothesis():
    output = evaluation.parse_generate_output(
        generate_text("BLEU4 = 12.34, 1.0/2.0/3.0/4.0 (BP=1.000, ratio=1.0)")
    )
    assert output.ids == [0, 1, 2]
    assert output.hypotheses == ["the cat sat on the mat .", "it 's a small world .", ""]
    assert output.references == [
        "the cat sat on the red mat .",
        "it 's a small world after all .",
        "",
    ]


# Generate lines for ONE_WORD_OFF as fairseq-generate prints them, written out by hand: unigram
# to 4-gram precision 5/6, 4/5, 3/4, 2/3, brevity penalty 1 (6 tokens each side).
ONE_WORD_OFF_GENERATE = """\
T-0\ta b c d e g
H-0\t-0.5\ta b c d e f
Generate test with beam=5: {bleu}
"""
ONE_WORD_OFF_PRINTED = (
    "BLEU4 = 75.98, 83.3/80.0/75.0/66.7 (BP=1.000, ratio=1.000, syslen=6, reflen=6)"
)


def test_score_split_scores_the_printed_bleu():
    output = evaluation.parse_generate_output(
        ONE_WORD_OFF_GENERATE.format(bleu=ONE_WORD_OFF_PRINTED)
    )
    scores = evaluation.score_split(output)
    assert scores["bleu"] == pytest.approx(ONE_WORD_OFF[2], abs=5e-5)  # rounded to 4 decimals
    assert scores["bleu_details"] == ONE_WORD_OFF_PRINTED
    assert scores["sentences"] == 1


def test_score_split_uses_the_untokenized_references_file(tmp_path):
    raw = tmp_path / "test.raw.en"
    raw.write_text("the cat sat on the red mat.\nit's a small world after all.\n\n")
    output = evaluation.parse_generate_output(generate_text("BLEU4 = 0.00, 0/0/0/0"))
    scores = evaluation.score_split(output, str(raw))
    expected = sacrebleu.corpus_bleu(
        ["the cat sat on the mat.", "it's a small world.", ""],
        [["the cat sat on the red mat.", "it's a small world after all.", ""]],
    )
    assert scores["sacrebleu"] == pytest.approx(round(expected.score, 4))
    assert scores["sacrebleu_references"] == str(raw)
    raw.write_text("only one line\n")
    with pytest.raises(ExperimentError, match="has 1 lines"):
        evaluation.score_split(output, str(raw))


def test_generate_command_is_the_iwslt_example():
    command = evaluation.generate_command("/data", "/ck/checkpoint_best.pt", "test", "/user_dir")
    line = " ".join(command)
    assert "fairseq_cli.generate /data --user-dir /user_dir --path /ck/checkpoint_best.pt" in line
    assert line.endswith(
        "--gen-subset test --beam 5 --batch-size 128 --required-batch-size-multiple 1 --remove-bpe"
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def fake_checkpoint(path, seed: int, keys=("encoder.weight", "decoder.bias", "steps")):
    generator = torch.Generator().manual_seed(seed)
    model = {
        "encoder.weight": torch.randn(3, 4, generator=generator),
        "decoder.bias": torch.randn(4, generator=generator).half(),
        "steps": torch.tensor([seed * 3 + 1]),
    }
    torch.save(
        {
            "model": {k: model[k] for k in keys},
            "cfg": {"seed": seed},
            "extra_state": {"epoch": seed},
        },
        path,
    )
    return model


def test_average_checkpoints_is_the_mean_of_the_parameters(tmp_path):
    paths = [str(tmp_path / f"checkpoint{i}.pt") for i in (3, 2, 1)]
    models = [fake_checkpoint(p, seed) for p, seed in zip(paths, (3, 2, 1))]
    averaged = evaluation.average_checkpoints(paths)
    weight_mean = sum(m["encoder.weight"] for m in models) / 3
    bias_mean = sum(m["decoder.bias"].float() for m in models) / 3
    torch.testing.assert_close(averaged["model"]["encoder.weight"], weight_mean)
    torch.testing.assert_close(
        averaged["model"]["decoder.bias"], bias_mean
    )  # half: averaged in fp32
    assert averaged["model"]["steps"].item() == (10 + 7 + 4) // 3  # integers: floor of the mean
    assert averaged["cfg"] == {"seed": 3} and averaged["extra_state"] == {
        "epoch": 3
    }  # from the first


def test_average_checkpoints_refuses_different_parameters(tmp_path):
    fake_checkpoint(tmp_path / "a.pt", 1)
    fake_checkpoint(tmp_path / "b.pt", 2, keys=("encoder.weight",))
    with pytest.raises(ExperimentError, match="other parameters"):
        evaluation.average_checkpoints([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])


def test_last_epoch_checkpoints_by_epoch_number(tmp_path):
    for name in [
        "checkpoint2.pt",
        "checkpoint9.pt",
        "checkpoint10.pt",
        "checkpoint11.pt",
        "checkpoint_best.pt",
        "checkpoint_last.pt",
        "checkpoint_3_500.pt",
    ]:
        (tmp_path / name).write_bytes(b"")
    newest = evaluation.checkpoint_inputs(
        str(tmp_path), evaluation.parse_checkpoint_choice("average:3")
    )
    assert [os.path.basename(p) for p in newest] == [
        "checkpoint11.pt",
        "checkpoint10.pt",
        "checkpoint9.pt",
    ]
    with pytest.raises(ExperimentError, match="average:5 needs 5 epoch checkpoints .* found 4"):
        evaluation.checkpoint_inputs(str(tmp_path), evaluation.parse_checkpoint_choice("average:5"))


def test_resolve_checkpoint(tmp_path):
    for epoch in (1, 2, 3):
        fake_checkpoint(tmp_path / f"checkpoint{epoch}.pt", epoch)
    path, sources = evaluation.resolve_checkpoint(
        str(tmp_path), evaluation.parse_checkpoint_choice("average:2")
    )
    assert os.path.basename(path) == "checkpoint_average2.pt"
    assert [os.path.basename(s) for s in sources] == ["checkpoint3.pt", "checkpoint2.pt"]
    expected = evaluation.average_checkpoints(sources)["model"]["encoder.weight"]
    torch.testing.assert_close(
        torch.load(path, weights_only=False)["model"]["encoder.weight"], expected
    )
    with pytest.raises(
        ExperimentError, match="--checkpoint best-loss: .*checkpoint_best.pt not found"
    ):
        evaluation.resolve_checkpoint(
            str(tmp_path), evaluation.parse_checkpoint_choice("best-loss")
        )
    with pytest.raises(ExperimentError, match="checkpoint folder not found"):
        evaluation.resolve_checkpoint(
            str(tmp_path / "missing"), evaluation.parse_checkpoint_choice("last")
        )


@pytest.mark.parametrize(
    "text, metric",
    [
        ("best-loss", "loss"),
        ("best-bleu", "bleu"),
        ("last", "loss"),
        ("average:1", "loss"),
        ("average:5", "loss"),
    ],
)
def test_parse_checkpoint_choice(text, metric):
    choice = evaluation.parse_checkpoint_choice(text)
    assert str(choice) == text and choice.selection_metric == metric


@pytest.mark.parametrize("text", ["", "best", "first", "average", "average:0", "average:x", "avg5"])
def test_parse_checkpoint_choice_rejects(text):
    with pytest.raises(
        SettingError, match="--checkpoint must be best-loss, best-bleu, last or average:N"
    ):
        evaluation.parse_checkpoint_choice(text)


def selected_checkpoint(path, metric, maximize):
    torch.save(
        {
            "model": {"w": torch.zeros(1)},
            "cfg": {
                "checkpoint": {
                    "best_checkpoint_metric": metric,
                    "maximize_best_checkpoint_metric": maximize,
                }
            },
        },
        path,
    )


@pytest.mark.parametrize(
    "metric, maximize, accepted, message",
    [
        ("loss", False, "best-loss", "selected by the lowest validation loss .*not by the highest"),
        ("bleu", True, "best-bleu", "selected by the highest validation bleu .*not by the lowest"),
        ("bleu", False, None, "selected by the lowest validation bleu"),
    ],
)
def test_best_protocols_check_what_checkpoint_best_was_selected_by(
    tmp_path, metric, maximize, accepted, message
):
    selected_checkpoint(tmp_path / "checkpoint_best.pt", metric, maximize)
    for protocol in ("best-loss", "best-bleu"):
        choice = evaluation.parse_checkpoint_choice(protocol)
        if protocol == accepted:
            path, _ = evaluation.resolve_checkpoint(str(tmp_path), choice)
            assert path == str(tmp_path / "checkpoint_best.pt")
        else:
            with pytest.raises(ExperimentError, match=f"--checkpoint {protocol}: .*{message}"):
                evaluation.resolve_checkpoint(str(tmp_path), choice)


def test_evaluation_inputs_change_with_what_the_evaluation_reads(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint_last.pt", 1)
    last = evaluation.parse_checkpoint_choice("last")
    before = evaluation.evaluation_inputs("data-bin", str(tmp_path), last)
    assert json.loads(json.dumps(before)) == before  # a stamp read back compares equal
    assert before["protocol"] == "last" and before["data_bin"] == os.path.abspath("data-bin")
    ((path, size, _),) = before["checkpoint_files"]
    assert (path, size) == (str(tmp_path / "checkpoint_last.pt"), os.path.getsize(path))
    assert before == evaluation.evaluation_inputs("data-bin", str(tmp_path), last)
    fake_checkpoint(tmp_path / "checkpoint_last.pt", 2)  # trained further
    os.utime(tmp_path / "checkpoint_last.pt", ns=(1, 1))
    after = evaluation.evaluation_inputs("data-bin", str(tmp_path), last)
    assert after["checkpoint_files"][0][2] == 1 and after != before
    changed = [
        evaluation.evaluation_inputs("data-bin", str(tmp_path), last, {"test": "test.raw.en"}),
        evaluation.evaluation_inputs("other-bin", str(tmp_path), last),
    ]
    assert all(inputs != after for inputs in changed)
    best = evaluation.evaluation_inputs("data-bin", str(tmp_path), CHOICES["best-loss"])
    assert "checkpoint_best.pt not found" in best["checkpoint_files"]  # not evaluable yet


CHOICES = {text: evaluation.parse_checkpoint_choice(text) for text in ("best-loss", "last")}


def test_evaluation_module_imports_without_torch():
    """The grid imports it for CheckpointChoice: torch and fairseq only inside its functions."""
    code = (
        "import sys, fairseq_asam_experiments.evaluation as e; "
        "e.parse_checkpoint_choice('average:3'); e.parser(); "
        "print(sorted(m for m in ('torch', 'fairseq') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "[]\n", done.stderr


def fake_run(tmp_path):
    """A run folder with checkpoint_best.pt (selected by loss) and checkpoint_last.pt, a folder
    with binarized valid and test index files, and a raw references folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    selected_checkpoint(run / "checkpoints" / "checkpoint_best.pt", "loss", False)
    selected_checkpoint(run / "checkpoints" / "checkpoint_last.pt", "loss", False)
    data_bin = tmp_path / "data-bin"
    data_bin.mkdir()
    for name in ("dict.de.txt", "valid.de-en.de.idx", "test.de-en.de.idx"):
        (data_bin / name).write_text("")
    return run, str(data_bin)


def canned_generate(jobs, log_path, env=None, call=None):
    """fairseq-generate's output without running it: ONE_WORD_OFF on valid, exact on test."""
    texts = []
    for command, output_path in jobs:
        bleu = ONE_WORD_OFF_PRINTED if "valid" in command else "BLEU4 = 100.00, 100/100/100/100"
        text = ONE_WORD_OFF_GENERATE.format(bleu=bleu)
        if "test" in command:
            text = text.replace("a b c d e f", "a b c d e g")
        with open(output_path, "w", encoding="utf-8") as f:
            f.write(text)
        texts.append(text)
    return texts


def test_evaluate_command_writes_whole_evaluations(tmp_path, monkeypatch, capsys):
    """fairseq-asam-evaluate: valid and test into results.json, the run's other entries kept;
    another --checkpoint replaces the evaluation whole, its sharpness included."""
    run, data_bin = fake_run(tmp_path)
    monkeypatch.setattr(evaluation, "run_generate", canned_generate)
    earlier = {"run": "adam-seed1", "test": {"bleu": 1.0}, "sharpness": {"estimates": []}}
    (run / "results.json").write_text(json.dumps(earlier))
    argv = [str(run), "--data-bin", data_bin, "--checkpoint", "best-loss"]
    assert evaluation.main(argv) == 0
    assert "valid: BLEU 75.98 (tokenized, assumed Table 4's metric)" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["run"] == "adam-seed1" and results["protocol"] == "best-loss"
    assert (results["valid"]["bleu"], results["test"]["bleu"]) == (75.9836, 100.0)
    assert results["checkpoint"]["selected_by"] == "loss" and "sharpness" not in results
    assert evaluation.main(argv[:-1] + ["last"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["protocol"] == "last" and results["checkpoint"]["path"].endswith("_last.pt")
    assert results["run"] == "adam-seed1"
    capsys.readouterr()
    no_test = tmp_path / "no-test"
    no_test.mkdir()
    (no_test / "valid.de-en.de.idx").write_text("")
    for flags, words in (
        (["--checkpoint", "best"], "--checkpoint must be best-loss, best-bleu, last or average:N"),
        (["--checkpoint", "best-bleu"], "--checkpoint best-bleu: .* selected by the lowest"),
        (["--references-dir", str(tmp_path)], "references file for valid not found"),
    ):
        assert evaluation.main([str(run), "--data-bin", data_bin] + flags) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fairseq-asam-evaluate: error: ")
        assert re.search(words, err), err
    assert evaluation.main([str(run), "--data-bin", str(no_test)]) == 1
    assert "split test: no such split in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "iterator, epoch",
    [({"epoch": 4, "iterations_in_epoch": 0}, 3), ({"epoch": 3, "iterations_in_epoch": 5}, 3)],
    ids=["end-of-epoch", "mid-epoch"],
)
def test_checkpoint_position_is_the_epoch_the_checkpoint_was_saved_in(tmp_path, iterator, epoch):
    """fairseq's EpochBatchIterator.state_dict records the epoch to resume with: epoch + 1 and
    0 iterations when saved at an epoch's end (checkpoint_best.pt of epoch 3 records 4)."""
    path = str(tmp_path / "checkpoint.pt")
    extra_state = {"train_iterator": iterator}
    state = {"model": {}, "cfg": {}, "optimizer_history": [{"num_updates": 12}]}
    torch.save({**state, "extra_state": extra_state}, path)
    assert evaluation.checkpoint_position(path) == {"epoch": epoch, "num_updates": 12}
