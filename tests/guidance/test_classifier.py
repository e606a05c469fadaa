"""The learned classifier: features, scoring, storage, the frozen label encoder, and use as an objective."""

import json
import zlib

import pytest
import torch

from cvg.guidance.binding import BoundComposition
from cvg.guidance.classifier import ClassifierConfig, ClassifierObjective, CompositionClassifier, LabelEncoder, label_of
from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig

GENERATOR = {"transformer": "0123abcd", "layers": [0, 1], "pool": [1, 1, 1]}


def _classifier(seed=0):
    torch.manual_seed(seed)
    return CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 4, 4), label_dim=8, generator=GENERATOR))


class _Labels:
    """A stand-in label encoder: a fixed random embedding per label."""

    def __call__(self, labels):
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(len(t))) for t in labels])


def test_save_and_load_round_trip(tmp_path):
    model = _classifier()
    maps, label = torch.rand(3, 2, 1, 3, 4, 4, 2), torch.randn(1, 8)
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
        _classifier()(torch.rand(1, 2, 1, 3, 4, 5, 2), torch.randn(1, 8))
    with pytest.raises(ValueError, match="expects maps of shape"):
        _classifier()(torch.rand(1, 2, 1, 3, 4, 4, 3), torch.randn(1, 8))  # more entities than slots


def test_features_separate_where_from_how_much():
    model = _classifier()
    maps = torch.rand(2, 2, 1, 3, 4, 4, 1)
    features = model.features(maps)
    torch.testing.assert_close(model.features(maps * 1e-3)[:, :96], features[:, :96])  # same shape of attention
    assert (model.features(maps * 1e-3)[:, 192:198] < features[:, 192:198] - 6).all()  # less mass: log falls
    assert features[:, 96:192].abs().max() == 0  # the empty second entity slot


def test_one_entity_compositions_fill_the_first_slot():
    model, label = _classifier(), torch.randn(1, 8)
    single = torch.rand(2, 2, 1, 3, 4, 4, 1)
    padded = torch.cat([single, torch.zeros_like(single)], dim=-1)
    torch.testing.assert_close(model(single, label), model(padded, label))


def test_objective_is_differentiable_and_positive():
    comp = Composition.parse("cube left of ball")
    bound = BoundComposition(comp, torch.tensor([3, 4, 7]), (([0, 1], [2]),) * 2)
    maps = (torch.rand(2, 2, 3, 3, 4, 4, 3) * 1e-2).requires_grad_()  # recorded: 3 heads, 3 tokens
    loss = ClassifierObjective(_classifier(), _Labels())(maps, bound)
    (grad,) = torch.autograd.grad(loss.sum(), maps)
    assert loss.shape == (2,) and (loss > 0).all() and grad.abs().sum() > 0


class _DistinctLabels:
    """A stand-in label encoder with a distinct fixed embedding per label text."""

    def __call__(self, labels):
        return torch.stack(
            [torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in labels]
        )


def test_a_label_family_is_scored_as_the_pairs_are():
    model, maps, labels = _classifier(), torch.rand(3, 2, 1, 3, 4, 4, 2), torch.randn(4, 8)
    scores = model.scores(maps, labels)
    assert scores.shape == (3, 4)
    for k in range(4):
        torch.testing.assert_close(scores[:, k], model(maps, labels[k : k + 1]))


def test_the_multiclass_objective_is_the_true_label_against_its_family():
    """-log softmax over the family: raising every label alike (the head's bias) leaves it where it was,
    where the binary objective falls; only the true label rising against its rivals lowers it."""
    comp = Composition.parse("cube left of ball")
    bound = BoundComposition(comp, torch.tensor([3, 4, 7]), (([0, 1], [2]),) * 2)
    maps = torch.rand(2, 2, 3, 3, 4, 4, 3) * 1e-2
    binary, multiclass = _classifier(), _classifier()
    multiclass.config.objective = "multiclass"
    family = [label_of(c) for c in comp.family()]
    assert family == ["cube left of ball", "cube right of ball", "cube above ball", "cube below ball"]
    logits = multiclass.scores(multiclass.inputs(maps, bound), _DistinctLabels()(family))
    losses = {}
    for name, model in (("binary", binary), ("multiclass", multiclass)):
        objective = ClassifierObjective(model, _DistinctLabels())
        before = objective(maps, bound)
        with torch.no_grad():
            model.bias += 5.0
        losses[name] = (before, objective(maps, bound))
    torch.testing.assert_close(losses["multiclass"][0], -logits.log_softmax(-1)[:, 0])
    torch.testing.assert_close(losses["multiclass"][1], losses["multiclass"][0])
    assert (losses["binary"][1] < losses["binary"][0] / 10).all()  # softplus(-(s + 5)): near 0


def _per_head(aggregator: str, seed: int = 0) -> CompositionClassifier:
    torch.manual_seed(seed)
    config = ClassifierConfig(
        layers=2, tiles=(3, 2, 2), heads=3, channels="words", aggregator=aggregator, label_dim=8, model_dim=16
    )
    return CompositionClassifier(config)


def test_the_paper_head_reads_every_head_and_word_apart(tmp_path):
    """Per-head, per-word maps through the transformer aggregator: the head axis kept (exchanging two heads'
    maps changes the score; a head reading their mean cannot tell), the noun and attribute channels apart,
    a gradient back to the recorded maps, and the same scores after a save and load."""
    comp = Composition.parse("red cube left of blue ball")
    # tokens: red, cube, blue, ball; columns [[0, 1], [2, 3]], nouns [[1], [3]]
    bound = BoundComposition(comp, torch.tensor([3, 4, 7, 8]), (([0, 1], [2, 3]),), (([1], [3]),))
    maps = (torch.rand(1, 2, 3, 3, 2, 2, 4) * 1e-2).requires_grad_()
    model, label = _per_head("transformer"), torch.randn(1, 8)
    inputs = model.inputs(maps, bound)
    assert inputs.shape == (1, 2, 3, 3, 2, 2, 4)
    torch.testing.assert_close(inputs[..., 0], maps[..., 1])  # the first entity's noun: "cube"
    torch.testing.assert_close(inputs[..., 1], maps[..., 0])  # its attributes: "red"
    score = model(inputs, label)
    (grad,) = torch.autograd.grad(score.sum(), maps)
    assert grad.abs().sum() > 0
    swapped = maps.detach()[:, :, [1, 0, 2]]
    assert not torch.allclose(model(model.inputs(swapped, bound), label), score)
    averaged = CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 2, 2), label_dim=8))
    pooled = BoundComposition(comp, bound.tokens, bound.columns)
    torch.testing.assert_close(
        averaged(averaged.inputs(swapped, pooled), label), averaged(averaged.inputs(maps.detach(), pooled), label)
    )
    model.save_pretrained(tmp_path)
    loaded = CompositionClassifier.from_pretrained(tmp_path)
    assert loaded.config.aggregator == "transformer" and loaded.config.heads == 3
    torch.testing.assert_close(loaded(inputs.detach(), label), score.detach())


def test_a_head_for_words_needs_a_binding_that_knows_the_nouns():
    bound = BoundComposition(Composition.parse("cube left of ball"), torch.tensor([3, 7]), (([0], [1]),))
    with pytest.raises(ValueError, match="does not know which words are nouns"):
        _per_head("mlp").inputs(torch.rand(1, 2, 3, 3, 2, 2, 2), bound)


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="classifier objective must be one of binary, multiclass, got 'ranking'"):
        ClassifierConfig(layers=1, tiles=(1, 1, 1), objective="ranking")
    with pytest.raises(ValueError, match="classifier aggregator must be one of mlp, transformer, got 'vlm'"):
        ClassifierConfig(layers=1, tiles=(1, 1, 1), aggregator="vlm")


def test_the_label_is_the_free_text_else_the_description():
    comp = Composition.parse("cube left of ball")
    assert label_of(comp) == "cube left of ball"
    labelled = Composition("motion", "ball", direction="right", label="the ball rolls to the right")
    assert label_of(labelled) == "the ball rolls to the right"


def test_label_encoder_is_frozen_normalised_and_cached():
    encoder = LabelEncoder()
    labels = ["red cube left of blue ball", "red cube to the left of blue ball", "two green triangles"]
    embeddings = encoder(labels)
    assert embeddings.shape == (3, 384) and encoder.dim == 384
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(encoder(labels[::-1]), embeddings.flip(0))  # order-independent, from the cache
    close, far = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert close > far  # paraphrases sit nearer than other compositions: what label transfer builds on
    assert not any(p.requires_grad for p in encoder.model.parameters())
    with pytest.raises(FileNotFoundError, match="label encoder directory"):
        LabelEncoder("/nonexistent/encoder")


def test_a_pipeline_loads_a_classifier_trained_for_its_generator(tiny_pipe, tmp_path):
    from cvg.models.tiny import tiny_wan_pipeline
    from cvg.models.wan import generator_description
    from cvg.pipeline import CVGPipeline

    pipe = CVGPipeline(tiny_pipe, guidance=GuidanceConfig(pool=(1, 1, 1), guide_steps=2, iterations=1))
    description = generator_description(tiny_pipe.transformer, None, (1, 1, 1))
    assert description["layers"] == [0, 1] and len(description["transformer"]) == 16
    torch.manual_seed(0)
    config = ClassifierConfig(layers=2, tiles=(3, 4, 4), generator=description)
    CompositionClassifier(config).save_pretrained(tmp_path)
    pipe.load_classifier(tmp_path)
    out = pipe(
        "a red cube to the left of a blue ball",
        "red cube left of blue ball",
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=3,
        max_sequence_length=64,
        output_type="latent",
    )
    assert isinstance(pipe.objective, ClassifierObjective) and len(out.objective_values) == 2
    other = CVGPipeline(tiny_wan_pipeline(seed=1), guidance=pipe.guidance)
    with pytest.raises(ValueError, match="trained for another generator \\(transformer"):
        other.load_classifier(tmp_path)
