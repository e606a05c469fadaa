"""`python -m cvg_research.experiments.findings` end to end at toy size: every kind of row runs and lands in the
table."""

import argparse

import pytest
import torch

from cvg.guidance.classifier import ClassifierConfig, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.models.wan import generator_description
from cvg_research.compshapes.dataset import read_index
from cvg_research.compshapes.grammar import novel_composition
from cvg_research.experiments import findings
from cvg_research.training.dual_inversion import LABEL_TRANSFER, SINGLE_READING


def _save_classifier(directory, description, seed=0):
    torch.manual_seed(seed)
    CompositionClassifier(ClassifierConfig(layers=2, tiles=(5, 2, 2), generator=description)).save_pretrained(directory)


def test_findings_rows_run_and_are_tabled(tiny_pipe, tmp_path):
    model, classifier, work = tmp_path / "model", tmp_path / "classifier", tmp_path / "work"
    tiny_pipe.save_pretrained(str(model))
    description = generator_description(tiny_pipe.transformer, None, (1, 2, 2))
    for directory in (classifier, classifier / SINGLE_READING, classifier / LABEL_TRANSFER):
        _save_classifier(directory, description)
    argv = [
        "--model",
        str(model),
        "--classifier",
        str(classifier),
        "--clips",
        "4",
        "--steps",
        "3",
        "--spec-seed",
        "10",  # its first four dev prompts: two state a novel composition (spatial, attribute)
        "--guidance",
        "strength=0.2,iterations=2,guide_steps=2",
        "--rows",
        "unguided,cvg,classifier,cvg-1,cvg-all,single,training-free,transfer",
        "--work",
        str(work),
        "--write",
        str(tmp_path / "findings.md"),
    ]
    findings.main(argv)
    text = (tmp_path / "findings.md").read_text()
    names = (
        "unguided",
        "CVG, first 2 steps (the settings' window)",
        "classifier alone, first 2 steps",
        "CVG, first 1 step |",
        "CVG, all steps",
        "CVG without dual inversion, first 2 steps",
        "training-free objectives",
        "label transfer",
    )
    for name in names:
        assert f"| {name}" in text
    header = (
        "| row | attribute | spatial | motion | numeracy | all | Fréchet distance | empty frames | colour bleeding |"
    )
    assert header in text
    unguided = next(line for line in text.splitlines() if line.startswith("| unguided"))
    assert unguided.count("[") == 5  # a 95% interval for each category and for all clips together
    assert "| row | right where unguided is wrong | wrong where unguided is right | difference (points) |" in text
    assert "--split dev" in text and "dev-split clips" in text
    (transfer,) = work.glob("*/transfer-*")  # the transfer row guides the novel compositions only
    assert [r["category"] for r in read_index(transfer)] == ["spatial", "attribute"]
    assert all(novel_composition(r["category"], r["composition"]["label"]) for r in read_index(transfer))
    main_table, novel_table = text.split("every row judged on them alone")
    assert "label transfer" not in main_table and "| label transfer" in novel_table
    assert "| row | attribute | spatial | all | Fréchet distance |" in novel_table
    assert novel_table.count("| unguided") == 1 and "right where CVG" in novel_table
    findings.main(argv)  # a second run reuses every generated clip
    assert "all reused" in (tmp_path / "findings.md").read_text()
    fewer = list(argv)
    fewer[fewer.index("--clips") + 1] = "2"  # the first two clips (spatial, motion) of the four generated
    with pytest.raises(SystemExit, match="1 of the first 2 prompts state a novel composition"):
        findings.main(fewer)
    fewer[fewer.index("--rows") + 1] = "unguided,cvg"
    findings.main(fewer)
    assert "| row | spatial | motion | all | Fréchet distance |" in (tmp_path / "findings.md").read_text()
    with pytest.raises(SystemExit):
        findings.main([*fewer, "--split", "heldout"])  # dev or test only
    _save_classifier(classifier, description, seed=1)  # retrained: its rows are generated again
    findings.main([*argv[:-6], "--rows", "cvg", *argv[-4:]])
    assert "cvg " in (tmp_path / "findings.md").read_text().split("Seconds per clip")[1]


def test_paired_counts_discordant_clips_and_tests_them_by_prompt():
    def report(failed, prompts):
        return {"verdicts": [{"file": f, "prompt": prompts[f], "ok": f not in failed} for f in "abcdef"]}

    one_each = {f: f for f in "abcdef"}
    text = findings.paired({"base": report("abce", one_each), "row": report("cd", one_each)}, "base")
    # a, b, e turned right; d turned wrong: exact sign flips over 4 clusters, P(|sum| >= 2) = 10/16
    assert "| row | 3 | 1 | +33.3 [" in text and text.endswith("| 0.62 |")
    # The same clips, a, b and e sharing one prompt: 2 clusters (+3, -1), every flip gives |sum| >= 2.
    shared = {**one_each, "b": "a", "e": "a"}
    text = findings.paired({"base": report("abce", shared), "row": report("cd", shared)}, "base")
    assert text.endswith("| 1 |")


def test_guidance_settings_parse_over_the_defaults_and_refuse_bad_ones():
    config = findings.guidance_settings("strength=0.2, normalize=polyak,target_loss=None")
    assert (config.strength, config.normalize, config.target_loss) == (0.2, "polyak", None)
    assert config.iterations == GuidanceConfig().iterations
    for text, message in (("bogus=1", "KEY=VALUE"), ("strength", "KEY=VALUE"), ("iterations=0", "between 1 and 100")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            findings.guidance_settings(text)
