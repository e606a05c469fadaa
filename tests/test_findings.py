"""`python -m cvg.experiments.findings` end to end at toy size: every kind of row runs and lands in the table."""

import torch

from cvg.classifier import ClassifierConfig, CompositionClassifier
from cvg.dual_inversion import SINGLE_READING
from cvg.experiments import findings
from cvg.pipeline import generator_description


def test_findings_rows_run_and_are_tabled(tiny_pipe, tmp_path):
    model, classifier = tmp_path / "model", tmp_path / "classifier"
    tiny_pipe.save_pretrained(str(model))
    description = generator_description(tiny_pipe.transformer, None, (1, 2, 2))
    for directory in (classifier, classifier / SINGLE_READING):
        torch.manual_seed(0)
        CompositionClassifier(ClassifierConfig(layers=2, tiles=(5, 2, 2), generator=description)).save_pretrained(
            directory
        )
    argv = ["--model", str(model), "--classifier", str(classifier), "--clips", "4", "--steps", "3",
            "--rows", "unguided,cvg-2,cvg-all,single,training-free", "--work", str(tmp_path / "work"),
            "--write", str(tmp_path / "findings.md")]  # fmt: skip
    findings.main(argv)
    text = (tmp_path / "findings.md").read_text()
    for name in ("unguided", "CVG, first 2 steps (default)", "CVG, all steps", "CVG without dual inversion",
                 "training-free objectives"):  # fmt: skip
        assert f"| {name}" in text
    assert "| row | attribute | spatial | motion | numeracy | all | Fréchet distance |" in text
    findings.main(argv)  # a second run reuses every generated clip
    assert "all reused" in (tmp_path / "findings.md").read_text()
