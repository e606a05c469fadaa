"""The layouts of diffusers' `WanPipeline` that cvg guides, told apart as diffusers runs them:

  wan2.1        one transformer for every step
  wan2.2-a14b   two experts (`transformer`, `transformer_2`): the first serves the timesteps at or above
                `boundary_ratio` x the scheduler's training timesteps, the second the rest
  wan2.2-ti2v   one transformer with a timestep per video token (`expand_timesteps`; TI2V-5B, whose VAE
                has 48 latent channels)

`directory_family` reads a saved pipeline's `model_index.json`, so that an unsupported pipeline, or a
two-expert one with an expert missing, is a one-line error before any weight is loaded.
"""

from __future__ import annotations

from pathlib import Path

from cvg.io.files import read_json_object

FAMILIES = ("wan2.1", "wan2.2-a14b", "wan2.2-ti2v")
PIPELINE_CLASS = "WanPipeline"


def family(boundary_ratio: float | None, expand_timesteps: bool) -> str:
    """The family of a WanPipeline with this config (two experts need a boundary: WanPipeline runs a
    pipeline without one on `transformer` alone)."""
    if expand_timesteps:
        return "wan2.2-ti2v"
    return "wan2.1" if boundary_ratio is None else "wan2.2-a14b"


def directory_family(path: str | Path) -> str:
    """The family of the pipeline saved in `path`, checked against what it holds."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline directory (no model_index.json)")
    index = read_json_object(index_file)
    class_name = index.get("_class_name")
    if class_name != PIPELINE_CLASS:
        what = f"holds a {class_name}" if class_name else "names no pipeline class (_class_name)"
        raise ValueError(f"{str(path)!r} {what}; cvg guides {PIPELINE_CLASS} pipelines ({', '.join(FAMILIES)})")
    name = family(index.get("boundary_ratio"), bool(index.get("expand_timesteps")))
    experts = ("transformer", "transformer_2") if name == "wan2.2-a14b" else ("transformer",)
    for expert in experts:
        entry = index.get(expert)
        if not isinstance(entry, list) or entry[0] is None or not (path / expert).is_dir():
            what = "its low-noise expert" if expert == "transformer_2" else "its transformer"
            raise ValueError(f"the {name} pipeline in {str(path)!r} lacks {expert}, {what}")
    return name
