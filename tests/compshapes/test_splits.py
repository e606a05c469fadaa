"""The sealed splits: no dev or test prompt, true or counterfactual, reaches a training set cvg builds."""

import collections

import pytest

from cvg_research.compshapes import dataset
from cvg_research.compshapes.grammar import (
    ALL_CATEGORIES,
    GrammarError,
    LeakError,
    check_sealed,
    family_key,
    sample_clip,
    split_of,
)
from cvg_research.training import dual_inversion, recipe
from cvg_research.training.recipe import GeneratorRecipe, training_clips


def _wordings(clip):
    return (clip.prompt, *clip.paraphrases, *(p for p, _ in clip.counterfactuals))


@pytest.mark.parametrize("stage", [1, 2])  # the VAE's clips, the transformer's
def test_the_generators_training_clips_hold_train_prompts_only(stage):
    clips = training_clips(GeneratorRecipe(), stage, 0, 300)
    assert {split_of(p) for c in clips for p in _wordings(c)} == {"train"}


def test_the_classifiers_training_clips_hold_train_prompts_only():
    clips = dual_inversion.compshapes_clips(0, 10, 200, "train", 17, 64)
    assert {split_of(p) for c in clips for p in _wordings(c)} == {"train"}


def _plant(monkeypatch, module, split: str):
    """Make the builder's third clip one of `split` (what a bug in the split filter would do)."""
    real = dataset.split_clip

    def planted(seed, index, category, _split, **size):
        return real(seed, index, category, split if index == 2 else _split, **size)

    monkeypatch.setattr(module, "split_clip", planted)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_a_planted_prompt_is_refused_by_every_builder(monkeypatch, split):
    _plant(monkeypatch, recipe, split)
    with pytest.raises(LeakError, match=f"is a {split}-split prompt; it may not reach a train set"):
        training_clips(GeneratorRecipe(), 2, 0, 5)
    _plant(monkeypatch, dual_inversion, split)
    with pytest.raises(LeakError, match=f"is a {split}-split prompt"):
        dual_inversion.compshapes_clips(0, 10, 5, "train", 17, 64)


def test_a_planted_counterfactual_is_refused():
    clip = dataset.split_clip(0, 0, "spatial", "train")
    test_clip = dataset.split_clip(0, 0, "spatial", "test")
    check_sealed(clip)
    leaky = clip.__class__(**{**clip.__dict__, "counterfactuals": test_clip.counterfactuals})
    with pytest.raises(LeakError, match=test_clip.counterfactuals[0][0]):
        check_sealed(leaky)
    with pytest.raises(LeakError):
        check_sealed(clip.__class__(**{**clip.__dict__, "paraphrases": (test_clip.prompt,)}))
    check_sealed(clip.__class__(**{**clip.__dict__, "prompt": "a photo of a cat"}))  # no grammar prompt: no split


def test_families_hold_wordings_and_counterfactuals():
    for seed in range(300):
        clip = sample_clip(seed, ALL_CATEGORIES[seed % 5])
        family = family_key(clip.prompt)
        assert all(family_key(p) == family for p in clip.paraphrases)
        if clip.category != "object":  # an object's counterfactual is another colour: another family
            assert all(family_key(p) == family for p, _ in clip.counterfactuals)
        else:
            assert all(split_of(p) == split_of(clip.prompt) for p, _ in clip.counterfactuals)
    assert family_key("a red cube to the left of a blue ball") == family_key("a blue sphere right of a crimson box")
    assert family_key("a red cube and a blue ball") == family_key("a blue cube and a red ball")
    assert family_key("two red cubes") == family_key("four scarlet blocks")
    assert family_key("a red cube moving up") != family_key("a red cube moving left")
    with pytest.raises(GrammarError, match="not a CompShapes prompt"):
        family_key("a photo of a cat")


def test_the_test_split_holds_a_hundred_prompts_per_category():
    """The v2 world's bar: >= 100 distinct test prompts in each category (2,000 draws each)."""
    prompts = collections.defaultdict(set)
    for index in range(2000):
        for category in ALL_CATEGORIES:
            clip = sample_clip(dataset.clip_seed(11, index), category, paraphrases=0)
            if split_of(clip.prompt) == "test":
                prompts[category].add(clip.prompt)
    assert all(len(prompts[c]) >= 100 for c in ALL_CATEGORIES), {c: len(p) for c, p in prompts.items()}
