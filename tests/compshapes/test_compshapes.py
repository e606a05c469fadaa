"""CompShapes: deterministic renders, a judge that is right on renders and rejects counterfactuals, datasets."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from cvg.cli import main
from cvg.guidance.composition import Composition
from cvg_research.compshapes.dataset import clip_seed, read_frames, read_index, split_clip, write_dataset
from cvg_research.compshapes.evaluate import evaluate
from cvg_research.compshapes.grammar import (
    ALL_CATEGORIES,
    CATEGORIES,
    Clip,
    novel_composition,
    sample_clip,
    split_of,
)
from cvg_research.compshapes.judge import detect, entity_colour_shape, judge_detections
from cvg_research.compshapes.stats import wilson_interval
from cvg_research.compshapes.world import COLOURS, SHAPES, WORD_TO_COLOUR, Scene, Thing, render


def test_rendering_is_deterministic_by_seed():
    for category in ALL_CATEGORIES:
        a, b = render(sample_clip(7, category).scene), render(sample_clip(7, category).scene)
        assert a.dtype == np.uint8 and a.shape == (17, 64, 64, 3) and np.array_equal(a, b)
        assert not np.array_equal(a, render(sample_clip(8, category).scene))


def test_a_window_of_frames_renders_as_those_frames_of_the_clip():
    scene = sample_clip(3, "motion").scene
    assert np.array_equal(render(scene, range(4, 9)), render(scene)[4:9])
    assert render(scene, range(16, 17)).shape == (1, 64, 64, 3)


def test_objects_stay_inside_the_frame():
    for seed in range(400):
        clip = sample_clip(seed, ALL_CATEGORIES[seed % 5])
        for thing in clip.scene.things:
            for t in (0.0, 1.0):
                x, y = thing.centre(t)
                assert thing.size <= x <= 64 - thing.size and thing.size <= y <= 64 - thing.size, (seed, thing)


@pytest.mark.parametrize("size", [4.8, 5.2, 6.7, 8.0])
def test_shapes_and_colours_are_told_apart(size):
    for index, shape in enumerate(SHAPES):  # every shape, each in two colours; every colour
        for colour in (list(COLOURS)[index], list(COLOURS)[-1 - index]):
            frame = render(Scene((Thing(shape, colour, 30.3, 33.7, size),), frames=1))[0]
            (found,) = detect(frame)
            assert (found.shape, found.colour) == (shape, colour)
            centroid_y = 33.7 + (size / 3 if shape == "triangle" else 0.0)  # 1/3 of a triangle's height up its base
            assert abs(found.x - 30.3) < 0.5 and abs(found.y - centroid_y) < 0.5


def test_judge_on_fresh_renders():
    """>= 99% right per category on 500 fresh clips, >= 99% of counterfactuals rejected."""
    base = random.SystemRandom().randrange(2**31)
    right, rejected, seen = ({c: 0 for c in ALL_CATEGORIES} for _ in range(3))
    for i in range(500):
        category = ALL_CATEGORIES[i % 5]
        clip = sample_clip(base + i, category)
        frames = render(clip.scene)
        detections = [detect(f) for f in frames]
        right[category] += judge_detections(detections, frames.shape[1:3], clip.composition).ok
        for _, counter in clip.counterfactuals:
            rejected[category] += not judge_detections(detections, frames.shape[1:3], counter).ok
        seen[category] += 1
    for c in ALL_CATEGORIES:
        assert right[c] >= 0.99 * seen[c], f"{c}: {right[c]}/{seen[c]} right (base seed {base})"
        assert rejected[c] >= 0.99 * seen[c], f"{c}: {rejected[c]}/{seen[c]} counterfactuals rejected (base {base})"


def test_prompts_and_counterfactuals_parse_and_fit():
    for seed in range(40):
        clip = sample_clip(seed, ALL_CATEGORIES[seed % 5])
        assert Composition.from_dict(clip.composition.to_dict()) == clip.composition
        for entity in clip.composition.entities:
            assert entity in clip.prompt
            entity_colour_shape(entity)
        for prompt, counter in clip.counterfactuals:
            assert counter != clip.composition and prompt != clip.prompt
        assert clip.paraphrases and clip.prompt not in clip.paraphrases
        colours = [WORD_TO_COLOUR[w] for w in clip.prompt.split() if w in WORD_TO_COLOUR]
        for paraphrase in clip.paraphrases:  # same colours in the same order, other words
            assert [WORD_TO_COLOUR[w] for w in paraphrase.split() if w in WORD_TO_COLOUR] == colours
        assert Clip.from_record(json.loads(json.dumps(clip.to_record()))) == clip


def test_dataset_writes_atomically_and_resumes(tmp_path):
    assert write_dataset(tmp_path, 6, seed=3) == 6
    index = tmp_path / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])  # an interrupted write: torn 5th line
    assert write_dataset(tmp_path, 8, seed=3) == 4  # clips 4..7
    records = read_index(tmp_path)
    assert [r["id"] for r in records] == list(range(8))
    assert not list(tmp_path.rglob("*.tmp*"))
    for record in records:
        clip = Clip.from_record(record)
        assert np.array_equal(read_frames(tmp_path, record), render(clip.scene))


def test_eval_command_reports_accuracy_with_intervals(tmp_path, capsys):
    write_dataset(tmp_path, 8)
    report_path = tmp_path / "report.json"
    assert main(["eval", "--videos", str(tmp_path), "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert all(c in printed for c in CATEGORIES) and "95% CI" in printed
    report = json.loads(report_path.read_text())
    assert report["categories"]["spatial"]["accuracy"] == 1.0 and report["failures"] == []
    # A wrong spec is caught and explained.
    records = read_index(tmp_path)
    records[0]["composition"] = records[0]["counterfactuals"][0]["composition"]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate(tmp_path)["failures"][0]["file"] == records[0]["file"]


def test_wilson_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(99, 100)
    assert 0.94 < low < 0.96 and 0.99 < high <= 1.0


@pytest.mark.parametrize("text, count", [("two yellow triangles", 2), ("3 red balls", 3)])
def test_counts_in_compositions(text, count):
    comp = Composition.parse(text)
    assert comp.kind == "presence" and comp.count == count and Composition.parse(comp.describe()) == comp


def _corrupt(clips, noise, seed=0):
    rng = np.random.default_rng(seed)
    return [np.clip(c + rng.normal(0, noise, c.shape) + 0.5, 0, 255).astype(np.uint8) for c in clips]


def test_frechet_distance_orders_corruptions():
    from cvg_research.compshapes.quality import artefact_rates, clip_features, frechet_distance, load_encoder

    encoder = load_encoder()

    def renders(base, n=160):
        return [render(sample_clip(base + i, CATEGORIES[i % 4]).scene) for i in range(n)]

    reference, other = clip_features(encoder, renders(50_000)), renders(60_000)
    distance = {
        "clean": frechet_distance(reference, clip_features(encoder, other)),
        "noise 25": frechet_distance(reference, clip_features(encoder, _corrupt(other, 25))),
        "noise 50": frechet_distance(reference, clip_features(encoder, _corrupt(other, 50))),
        "colour swap": frechet_distance(reference, clip_features(encoder, [c[..., ::-1].copy() for c in other])),
        # Spatial clips whose two objects trade places: as clean, and composed wrong for their prompts.
        "relations flipped": frechet_distance(reference, clip_features(encoder, _flipped(base=60_000))),
    }
    assert distance["clean"] < distance["noise 25"] < distance["noise 50"], distance
    assert distance["clean"] < distance["colour swap"], distance
    assert distance["relations flipped"] < distance["noise 25"], distance  # the score does not judge composition
    assert artefact_rates(other[:8]) == {"empty_frames": 0.0, "colour_bleeding": 0.0}
    assert artefact_rates(_corrupt(other[:8], 50))["colour_bleeding"] > 0.3
    assert artefact_rates([np.full_like(other[0], 205)])["empty_frames"] == 1.0


def _flipped(base: int, n: int = 160) -> list[np.ndarray]:
    clips = []
    for i in range(n):
        scene = sample_clip(base + i, CATEGORIES[i % 4]).scene
        if len(scene.things) == 2:
            a, b = scene.things
            scene = replace(scene, things=(replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)))
        clips.append(render(scene))
    return clips


def test_encoder_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from cvg_research.compshapes.quality import train_encoder

    for run in ("a", "b"):
        train_encoder(tmp_path / run, clips=48, epochs=1, seed=5)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_reads_mp4_videos(tmp_path):
    """Generated videos come as mp4: the same index format, decoded with imageio."""
    from cvg.io.video import save_frames

    write_dataset(tmp_path, 4, seed=9)
    records = read_index(tmp_path)
    for record in records:
        mp4 = record["file"].replace(".npz", ".mp4")
        save_frames(read_frames(tmp_path, record), tmp_path / mp4, fps=8)
        record["file"] = mp4
    specs = tmp_path / "mp4.jsonl"
    specs.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = evaluate(tmp_path, specs, quality=False)
    assert all(entry["accuracy"] == 1.0 for entry in report["categories"].values())
    assert "quality" not in report


def test_a_failed_write_leaves_nothing(tmp_path):
    from cvg.io.files import atomic_path

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "clip.npz") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_split_clips_hold_their_split_in_every_wording_and_counterfactual():
    for i in range(60):
        category = ALL_CATEGORIES[i % 5]
        assert split_clip(3, i, category, "all") == sample_clip(clip_seed(3, i), category)  # as before splits
        for split in ("train", "dev", "test"):
            clip = split_clip(3, i, category, split)
            assert clip.counterfactuals
            wordings = (clip.prompt, *clip.paraphrases, *(p for p, _ in clip.counterfactuals))
            assert {split_of(p) for p in wordings} == {split}, wordings
    prompts = {sample_clip(s, c).prompt for s in range(300) for c in ALL_CATEGORIES}
    shares = {s: sum(split_of(p) == s for p in prompts) / len(prompts) for s in ("train", "dev", "test")}
    assert 0.5 < shares["train"] < 0.7 and 0.12 < shares["dev"] < 0.28 and 0.12 < shares["test"] < 0.28, shares
    with pytest.raises(ValueError, match="split must be one of"):
        split_clip(0, 0, "object", "heldout")


def test_dataset_command_writes_test_split_clips(tmp_path):
    out = tmp_path / "held"
    assert (
        main(
            [
                "compshapes-dataset",
                "--out",
                str(out),
                "--count",
                "6",
                "--categories",
                "object,motion",
                "--split",
                "test",
            ]
        )
        == 0
    )
    records = read_index(out)
    assert [r["category"] for r in records] == ["object", "motion"] * 3
    assert all(split_of(r["prompt"]) == "test" for r in records)


def test_novel_compositions_are_whole_compositions_closed_under_the_counterfactual():
    clips = [sample_clip(seed, category) for seed in range(200) for category in CATEGORIES]
    for clip in clips:  # a clip and its counterfactual are held out together, in every wording
        counter = clip.counterfactuals[0][1]
        assert novel_composition(clip.category, clip.composition.label) == novel_composition(
            clip.category, counter.label
        )
    for category in CATEGORIES:  # each category holds out a part of its compositions, never all
        share = np.mean([novel_composition(c.category, c.composition.label) for c in clips if c.category == category])
        assert 0.02 < share < 0.5, (category, share)
    assert novel_composition("attribute", "green block and red ball")
    assert novel_composition("attribute", "crimson block and blue ball")
    assert not novel_composition("attribute", "pink block and blue ball")
    assert novel_composition("spatial", "red cube on top of blue ball")
    assert novel_composition("spatial", "blue sphere beneath green cube")
    assert not novel_composition("spatial", "blue cube to the left of red ball")
    assert novel_composition("motion", "yellow ball moves up") and not novel_composition(
        "motion", "yellow ball moves left"
    )
    assert novel_composition("numeracy", "three red pyramids") and not novel_composition("numeracy", "two blue cubes")
    assert not novel_composition("object", "red cube")
