"""What one generation asks for (`GenerationRequest`) and how a pipeline is set up to serve it
(`PipelineOptions`), each declared once. The command line's flags, the HTTP schema, `cvg.Engine`,
`CVGPipeline.__call__` / `from_pretrained` and the C++ `EngineOptions` take their names, defaults, help and
bounds from these fields, and a request is checked here whichever door it came in by. Plain data (no torch):
the command line builds both without loading the model stack."""

from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

PRECISIONS = ("float32", "bfloat16", "float16")
STEP_BACKENDS = ("torch", "compiled", "onnxruntime", "tensorrt")  # cvg.runtime.step_backend's; "auto" picks one
MAX_STEPS = 1000  # the schedulers' training timesteps: a longer schedule repeats timesteps
MAX_TEXT_TOKENS = 512  # Wan's text length (UMT5's positions)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
MAX_ITERATIONS = 100  # updates per guided step: no door lets a generation run for hours
SERVED_STEPS = 20  # a served request's default denoising steps (cvg.Engine, cvg serve): the shipped model's schedule


def documented(default, help: str, low: float | None = None, high: float | None = None, choices=None):
    """A field with its help text and bounds beside its default: every door reads all of them from here."""
    metadata = {"help": help, "low": low, "high": high, "choices": choices}
    return field(default=default, metadata=metadata)


def check_field(name: str, value, kind: type, spec: dict) -> None:
    """`value` against field `name`'s declared type (int, float, bool or str; None allowed by the caller)
    and bounds; a ValueError naming the field."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    low, high, choices = spec.get("low"), spec.get("high"), spec.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _scalar_type(annotation: str) -> type | None:
    """The checked type of a field annotation written as a string ("int | None" -> int); None: unchecked."""
    names = {part.strip() for part in annotation.split("|")} - {"None"}
    return {"int": int, "float": float, "bool": bool, "str": str}.get(names.pop()) if len(names) == 1 else None


def check_fields(config) -> None:
    """Every scalar field of the dataclass instance `config` against its declaration."""
    for f in fields(config):
        value, kind = getattr(config, f.name), _scalar_type(str(f.type))
        if value is not None and kind is not None:
            check_field(f.name, value, kind, f.metadata)


def declared(config: type) -> dict[str, dict]:
    """Each field of a declaration: its default (MISSING when required), help and bounds."""
    return {f.name: {"default": f.default, "kind": _scalar_type(str(f.type)), **f.metadata} for f in fields(config)}


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, as every door asks for it. Fields left None take the model's setting (its size, its
    text length) or the guidance config's; names are diffusers' `WanPipeline.__call__` arguments where it has
    one."""

    prompt: str | list[str] = documented(MISSING, "the text prompt, or one per video of a batch")
    composition: object = documented(
        None,
        'what must hold: "red cube left of blue ball", "ball moves right", "red cube and blue ball", a JSON '
        "object or a `Composition`; a list: one per prompt; None: unguided",
    )
    negative_prompt: str | list[str] | None = documented(None, "negative prompt of classifier-free guidance")
    seed: int = documented(0, "seed of the initial noise", low=0, high=MAX_SEED)
    height: int | None = documented(  # its bounds are the model's: a positive multiple of its patch size
        None, "video height in pixels (None: the size a cvg-trained model records, else the family's)"
    )
    width: int | None = documented(None, "video width in pixels (None: as height)")
    num_frames: int | None = documented(None, "video frames, 4k+1 (None: as height)", low=1)
    num_inference_steps: int = documented(50, "denoising steps", low=1, high=MAX_STEPS)
    guidance_scale: float = documented(5.0, "classifier-free guidance scale")
    guidance_scale_2: float | None = documented(
        None, "Wan 2.2 A14B: the low-noise expert's classifier-free guidance scale (None: guidance_scale)"
    )
    guide_steps: int | None = documented(
        None, "guided steps at the start (None: the guidance config's, or every step of a shorter schedule)", low=0
    )
    guidance_strength: float | None = documented(
        None, "RMS of each latent update (None: the guidance config's strength)", low=0
    )
    iterations: int | None = documented(
        None, "at most this many updates per guided step (None: the guidance config's)", low=1, high=MAX_ITERATIONS
    )
    num_videos_per_prompt: int = documented(1, "videos per prompt", low=1)
    max_sequence_length: int | None = documented(
        None,
        "text tokens the prompt is padded to (None: the family's, Wan 512, CogVideoX 226)",
        low=1,
        high=MAX_TEXT_TOKENS,
    )

    def check(self) -> None:
        """What no model accepts (a ValueError naming the field); the model checks the rest (multiples of its
        patch size, frame counts, whether it has a second expert: `CVGPipeline.check_inputs`)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError(f"prompt must be a non-empty string or list of them, got {self.prompt!r}"[:200])
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or list of them; one is empty or not a string")
        negatives = [self.negative_prompt] if isinstance(self.negative_prompt, str | None) else self.negative_prompt
        if not isinstance(negatives, list | tuple) or not all(isinstance(n, str | None) for n in negatives):
            raise ValueError("negative_prompt must be a string, a list of them, or None")
        check_fields(self)

    def settings(self) -> tuple:
        """What must match for requests to share one denoising run (all but what each item brings)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in BATCH_ITEM_FIELDS)


BATCH_ITEM_FIELDS = ("prompt", "composition", "negative_prompt", "seed")  # what may differ within a batch


@dataclass(frozen=True)
class PipelineOptions:
    """How a pipeline is loaded and runs its steps: fixed for its life, whatever it is asked."""

    transformer_dtype: str = documented("float32", "precision of the transformer", choices=PRECISIONS)
    vae_dtype: str = documented("float32", "precision of the VAE decode, chosen apart", choices=PRECISIONS)
    step_backend: str | None = documented(
        None,
        "run the unguided forwards on this step backend (cvg.runtime.step_backend; auto: the fastest that builds "
        "here); None or eager: diffusers' own forwards",
        choices=(*STEP_BACKENDS, "auto", "eager"),
    )
    backend_cache: str | Path | None = documented(
        None, "where step backends keep their built artefacts (None: $CVG_CACHE/engines or ~/.cache/cvg/engines)"
    )
    batch_cfg: bool | None = documented(
        None,
        "run a step's conditional and unconditional forwards as one batch of two (None: as the model's "
        "diffusers pipeline runs them, off for Wan, on for CogVideoX)",
    )
    first_block_cache: float | None = documented(
        None, "diffusers' FirstBlockCache at this threshold on the unguided steps after the guided ones", low=0
    )
    taylorseer_cache: int | None = documented(
        None,
        "diffusers' TaylorSeer on the unguided steps after the guided ones, computing every this many steps",
        low=1,
    )
    classifier: str | None = documented(None, "guide with a classifier from cvg train-classifier (its directory)")

    def check(self) -> None:
        check_fields(self)
        chosen = [name for name in ("first_block_cache", "taylorseer_cache") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError("first_block_cache and taylorseer_cache: choose one step cache")
        if self.step_backend not in (None, "eager") and chosen:
            raise ValueError(
                f"{chosen[0]} runs on eager diffusers forwards; step_backend={self.step_backend!r} bypasses its hooks"
            )


@dataclass(frozen=True)
class ServerOptions:
    """How `cvg serve` serves: where it listens, who may ask, and what bounds a job (a job's own settings are
    `GenerationRequest`'s). `cvg serve`'s flags are these fields."""

    host: str = documented("127.0.0.1", "address to listen on")
    port: int = documented(8000, "port (0: any free)", low=0, high=65535)
    token_file: str | None = documented(
        None, "a file holding the bearer token every request but /healthz must carry (else --token, $CVG_SERVE_TOKEN)"
    )
    token: str | None = documented(
        None, "the bearer token itself: deprecated, any local user reads it in the process list (use --token-file)"
    )
    served_model_name: str | None = documented(
        None, "the name clients give as `model` and GET /v1/models lists (None: the model directory's name)"
    )
    out_dir: str | None = documented(
        None, "where the server writes job outputs (None: a new temporary directory of its own)"
    )
    queue_size: int = documented(16, "jobs that may wait (more: 429)", low=1)
    keep_seconds: float = documented(3600.0, "how long a finished job and its files are kept", low=1)
    max_batch: int = documented(
        1,
        "queued jobs of the same settings run as one batch, up to this many (1: each alone, exact; batched "
        "items equal their solo runs to float rounding; a step engine is built once per batch size)",
        low=1,
    )
    batch_window: float = documented(0.05, "seconds a job waits for others to batch with", low=0, high=10)
    max_job_cost: float = documented(
        16.0,
        "refuse a job costing more than this many times the server's default guided job (pixels x frames x "
        "(steps + 2 per guided update))",
        low=1,
    )
    job_timeout: float = documented(1800.0, "a job still running after this many seconds fails at its next step", low=1)
    max_connections: int | None = documented(
        None,
        "open connections at most; past it the one waiting longest for its request is closed (None: 1000, or "
        "fewer to stay under the process's file limit)",
        low=1,
    )
    ray_replicas: int | None = documented(
        None,
        "run the engines as this many Ray Serve replicas on a local Ray cluster (the optional 'serve' extra), "
        "behind the same API",
        low=1,
    )


REQUEST_FIELDS = frozenset(f.name for f in fields(GenerationRequest))
PIPELINE_ALIASES = {"engine": "step_backend", "engine_cache": "backend_cache", "batch_cfg": "batch_cfg"}


def with_deprecated(options, given: dict, aliases: dict[str, str], owner: str):
    """`options` with the keyword arguments `given` under their old names (`aliases`: old -> field), each with a
    DeprecationWarning; a TypeError for a name that is neither."""
    unknown = set(given) - set(aliases)
    if unknown:
        raise TypeError(f"{owner}() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    for old, value in given.items():
        new = aliases[old]
        warnings.warn(f"{owner}({old}=...) is deprecated: {type(options).__name__}({new}=...)", DeprecationWarning, 3)
        options = replace(options, **{new: str(value) if isinstance(value, Path) else value})
    return options
