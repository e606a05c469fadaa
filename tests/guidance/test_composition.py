"""Composition specs: parsing, validation, and mapping words to prompt tokens."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvg.guidance.composition import Composition, CompositionError


@pytest.mark.parametrize(
    "text, expected",
    [
        ("red cube left of blue ball", Composition("spatial", "red cube", relation="left of", object="blue ball")),
        (
            "A red cube to the left of a blue ball",
            Composition("spatial", "a red cube", relation="to the left of", object="a blue ball"),
        ),
        ("cat above dog", Composition("spatial", "cat", relation="above", object="dog")),
        ("ball moves right", Composition("motion", "ball", direction="right")),
        ("the green car moving up", Composition("motion", "the green car", direction="up")),
        ("red cube and blue ball", Composition("presence", "red cube", object="blue ball")),
        ("owl", Composition("presence", "owl")),
        (
            '{"kind": "spatial", "subject": "red cube", "relation": "right of", "object": "ball", "label": "x"}',
            Composition("spatial", "red cube", relation="right of", object="ball", label="x"),
        ),
    ],
)
def test_parse(text, expected):
    assert Composition.parse(text) == expected


def test_label_defaults_to_a_description_and_round_trips():
    comp = Composition.parse("red cube left of blue ball")
    assert comp.label == "red cube left of blue ball"
    assert Composition.from_dict(comp.to_dict()) == comp


def test_axis_and_sign():
    assert Composition.parse("a left of b").axis_sign == (0, -1)
    assert Composition.parse("a below b").axis_sign == (1, 1)
    assert Composition.parse("ball moves up").axis_sign == (1, -1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("{bad json", "malformed"),
        ('{"kind": "colour", "subject": "x"}', "kind must be one of"),
        ('{"kind": "spatial", "subject": "x", "relation": "near", "object": "y"}', "relation must be one of"),
        ('{"kind": "spatial", "subject": "x", "relation": "above"}', "needs an object"),
        ("ball moves sideways", "direction must be one of"),
        ('{"kind": "motion", "subject": "x", "direction": "up", "speed": 3}', "unknown fields: speed"),
        ("a, b, c", "one or two entities"),
        ("red cube left of red cube", "names 'red cube' twice"),
        ("Red  Cube and red cube", "twice"),
    ],
)
def test_bad_compositions_get_one_line_errors(text, message):
    with pytest.raises(CompositionError, match=message) as info:
        Composition.parse(text)
    assert "\n" not in str(info.value)


def test_bind_finds_entity_tokens(tiny_pipe):
    tok = tiny_pipe.tokenizer
    bound = Composition.parse("red cube left of blue ball").bind(tok, ["a red cube to the left of a blue ball"], 64)
    ids = tok("a red cube to the left of a blue ball")["input_ids"]
    words = tok.convert_ids_to_tokens([ids[i] for i in bound.tokens.tolist()])
    assert words == ["red", "cube", "blue", "ball"]
    assert bound.columns == (([0, 1], [2, 3]),)
    assert bound.nouns == (([1], [3]),)  # each entity's last word; the words before it are its attributes
    maps = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    assert bound.word_maps(maps).tolist() == [[2.0, 1.0, 8.0, 4.0]]  # noun, then attributes, per entity
    alone = Composition.parse("ball moves left").bind(tok, ["a ball moves left"], 64)
    assert alone.word_maps(torch.tensor([[5.0]])).tolist() == [[5.0, 5.0]]  # no attribute: the noun again


def test_bind_batch_uses_a_shared_token_list(tiny_pipe):
    prompts = ["a red cube to the left of a blue ball", "on a table, a tiny red cube sits left of a blue ball"]
    bound = Composition.parse("red cube left of blue ball").bind(tiny_pipe.tokenizer, prompts, 64)
    maps = torch.arange(2 * len(bound.tokens), dtype=torch.float32).view(2, 1, -1)
    per_entity = bound.entity_maps(maps)
    for b, entities in enumerate(bound.columns):
        for e, cols in enumerate(entities):
            assert per_entity[b, 0, e] == maps[b, 0, cols].mean()
    assert bound.columns[0] != bound.columns[1]


def test_word_absent_from_prompt(tiny_pipe):
    with pytest.raises(CompositionError, match="'green ball' is not in the prompt") as info:
        Composition.parse("red cube left of green ball").bind(tiny_pipe.tokenizer, ["a red cube and a blue ball"], 64)
    assert "\n" not in str(info.value)


def test_word_past_the_token_limit(tiny_pipe):
    prompt = "a " * 40 + "red cube left of blue ball"
    with pytest.raises(CompositionError, match="past the first 16"):
        Composition.parse("red cube left of blue ball").bind(tiny_pipe.tokenizer, [prompt], 16)


def test_the_same_words_for_two_entities_are_refused(tiny_pipe):
    """ "cube" and "red cube" both find the first "red cube" of this prompt: no gradient could part them."""
    composition = Composition.parse("red cube left of cube")
    with pytest.raises(CompositionError, match="share prompt tokens"):
        composition.bind(tiny_pipe.tokenizer, ["a red cube left of a cube"], 64)


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
WORDS = st.sampled_from(["red", "cube", "left", "of", "and", "moves", "two", "²", "0", "{", "}", ",", "above", " "])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=60), st.lists(WORDS, max_size=8).map(" ".join)))
def test_any_text_parses_or_gets_a_composition_error(text):
    try:
        composition = Composition.parse(text)
    except CompositionError as e:
        assert "\n" not in str(e)
        return
    assert Composition.from_dict(composition.to_dict()) == composition
    assert Composition.parse(json.dumps(composition.to_dict())) == composition


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.dictionaries(
        st.sampled_from(["kind", "subject", "relation", "object", "direction", "count", "label"]),
        JSON_VALUES | st.sampled_from(["spatial", "motion", "presence", "left of", "up", "x"]),
        max_size=7,
    )
)
def test_any_json_object_is_a_composition_or_a_composition_error(data):
    try:
        composition = Composition.parse(json.dumps(data))
    except CompositionError as e:
        assert "\n" not in str(e)
        return
    assert Composition.from_dict(composition.to_dict()) == composition


@pytest.mark.parametrize(
    ("text", "members"),
    [
        (
            "red cube to the left of blue ball",
            [
                "red cube left of blue ball",
                "red cube right of blue ball",
                "red cube above blue ball",
                "red cube below blue ball",
            ],
        ),
        (
            "red cube under blue ball",  # the relations in one set of words
            ["red cube below blue ball", *(f"red cube {r} blue ball" for r in ("left of", "right of", "above"))],
        ),
        ("ball moves up", ["ball moves up", "ball moves left", "ball moves right", "ball moves down"]),
        ("three red balls", ["three red balls", "one red balls", "two red balls", "four red balls", "five red balls"]),
        ("red cube and blue ball", ["red cube and blue ball", "blue cube and red ball"]),
        ("red cube and red ball", ["red cube and red ball"]),  # the swap names the same pair
        ("cube and ball", ["cube and ball"]),
        ("red cube", ["red cube"]),
    ],
)
def test_a_label_family_holds_the_composition_first_and_its_rivals(text, members):
    family = Composition.parse(text).family()
    assert [c.label for c in family] == members
    assert len({c.label for c in family}) == len(family)
    assert all(Composition.parse(c.label).family() == family for c in family[:1])  # the family of its own words


def test_a_family_member_drops_a_free_text_label():
    composition = Composition.from_dict({"kind": "motion", "subject": "ball", "direction": "left", "label": "L"})
    assert [c.label for c in composition.family()][:2] == ["ball moves left", "ball moves right"]
