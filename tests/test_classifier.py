"""The learned classifier's interface: scoring, storage, and use as an objective."""

import json

import pytest
import torch

from cvg.classifier import ClassifierConfig, ClassifierObjective, CompositionClassifier
from cvg.composition import BoundComposition, Composition

GENERATOR = {"model": "tiny-wan", "layers": [0, 1], "pool": [1, 1, 1]}


def _classifier(seed=0):
    torch.manual_seed(seed)
    return CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 4, 4), label_dim=8, generator=GENERATOR))


def test_save_and_load_round_trip(tmp_path):
    model = _classifier()
    maps, label = torch.rand(3, 2, 3, 4, 4, 2), torch.randn(1, 8)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["generator"] == GENERATOR
    loaded = CompositionClassifier.from_pretrained(tmp_path, generator=GENERATOR)
    assert torch.equal(loaded(maps, label), model(maps, label))
    assert not list(tmp_path.glob("*tmp*"))


def test_loading_against_another_generator_fails(tmp_path):
    _classifier().save_pretrained(tmp_path)
    other = {**GENERATOR, "pool": [1, 2, 2]}
    with pytest.raises(ValueError, match=r"trained for another generator \(pool: trained for \[1, 1, 1\]"):
        CompositionClassifier.from_pretrained(tmp_path, generator=other)


def test_missing_files_and_wrong_maps(tmp_path):
    with pytest.raises(FileNotFoundError, match="no classifier"):
        CompositionClassifier.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expects maps of shape"):
        _classifier()(torch.rand(1, 2, 3, 4, 5, 2), torch.randn(1, 8))


def test_objective_is_differentiable_and_positive():
    comp = Composition.parse("cube left of ball")
    bound = BoundComposition(comp, torch.tensor([3, 4, 7]), (([0, 1], [2]),) * 2)
    maps = (torch.rand(2, 2, 3, 4, 4, 3) * 1e-2).requires_grad_()
    loss = ClassifierObjective(_classifier(), torch.randn(1, 8))(maps, bound)
    (grad,) = torch.autograd.grad(loss.sum(), maps)
    assert loss.shape == (2,) and (loss > 0).all() and grad.abs().sum() > 0
