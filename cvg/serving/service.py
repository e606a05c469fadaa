"""`Engine`: a model served at one video shape, built once, then called per request from any thread.

    engine = Engine("models/compshapes-wan", options=PipelineOptions(step_backend="auto"))  # the model's size
    video = engine.generate("a red cube to the left of a blue ball", "red cube left of blue ball", seed=0)

Building exports or loads the step backend for the shape (see `cvg.runtime.step_backend`) and runs one guided
warm-up generation, so the first request pays no build cost. Requests are serialised by a lock: the pipeline's
scheduler and the step backend's buffers are shared state, and interleaving them would corrupt both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig
from cvg.pipeline import CVGOutput, CVGPipeline
from cvg.request import (
    BATCH_ITEM_FIELDS,
    REQUEST_FIELDS,
    SERVED_STEPS,
    GenerationRequest,
    PipelineOptions,
    with_deprecated,
)
from cvg.threads import pinned_threads, thread_count

WARMUP_PROMPT, WARMUP_COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"
# The engine's keyword arguments before `PipelineOptions` held them (deprecated), by the option they set.
ENGINE_ALIASES = {
    "backend": "step_backend",
    "cache_dir": "backend_cache",
    "classifier": "classifier",
    "batch_cfg": "batch_cfg",
    "transformer_dtype": "transformer_dtype",
    "vae_dtype": "vae_dtype",
}


class Engine:
    def __init__(
        self,
        model: str | Path | CVGPipeline,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        *,
        options: PipelineOptions | None = None,
        guidance: GuidanceConfig | None = None,
        threads: int | None = None,
        max_composition_tokens: int = 16,
        **settings,
    ):
        """`model` a local diffusers directory (loaded with `options`) or a `CVGPipeline` (run as it is).
        `settings` are `GenerationRequest` fields every request takes unless it sets them (the size defaults
        to the one a cvg-trained model records, the steps to `SERVED_STEPS`). Each request runs with `threads`
        intra-op threads (default `cvg.threads.thread_count()`), whichever thread calls it, so a request's
        pixels equal the sequential run's; a composition of more than `max_composition_tokens` prompt tokens
        is refused rather than silently truncated. `backend`, `cache_dir`, `classifier`, `batch_cfg`,
        `transformer_dtype` and `vae_dtype` are deprecated keywords of `options`' fields."""
        deprecated = {k: settings.pop(k) for k in list(settings) if k not in REQUEST_FIELDS}
        deprecated = {
            k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in deprecated.items()
        }
        if isinstance(model, CVGPipeline):
            self.pipe = model
            if options is not None or deprecated or guidance is not None:
                base = with_deprecated(options or model.options, deprecated, ENGINE_ALIASES, "Engine")
                self.pipe = CVGPipeline(
                    model.pipe, model.objective, guidance or model.guidance, base, cache=model.cache
                )
                if base.classifier is not None:
                    self.pipe.load_classifier(base.classifier)
        else:
            options = with_deprecated(
                options or PipelineOptions(step_backend="auto"), deprecated, ENGINE_ALIASES, "Engine"
            )
            self.pipe = CVGPipeline.from_pretrained(model, options=options, guidance=guidance)
        self.pipe.pipe.set_progress_bar_config(disable=True)  # a server's stderr is for its own logs
        size = self.pipe.resolved(GenerationRequest(WARMUP_PROMPT, height=height, width=width, num_frames=num_frames))
        self.defaults = {
            "num_inference_steps": SERVED_STEPS,
            **{k: getattr(size, k) for k in ("height", "width", "num_frames", "max_sequence_length")},
            **settings,
        }
        self.max_composition_tokens = max_composition_tokens
        self._lock = threading.Lock()
        self.threads = threads or thread_count()  # every request splits its sums the same way
        start = time.perf_counter()
        self.generate(WARMUP_PROMPT, WARMUP_COMPOSITION, seed=0)
        self.build_seconds = time.perf_counter() - start

    @property
    def backend(self) -> str:
        engines = list(self.pipe.steps.backends.values())
        return engines[0].backend if engines else "torch (diffusers eager)"

    @property
    def config(self) -> GenerationRequest:
        """The engine's settings: what a request that sets nothing runs with (its prompt empty)."""
        return self.settings()

    def settings(self, **overrides) -> GenerationRequest:
        """The engine's settings with a request's `overrides` (None keeps the engine's), prompt empty."""
        return self.request("", **overrides)

    def request(self, prompt: str | list[str], composition=None, **given) -> GenerationRequest:
        """A `GenerationRequest` of `prompt` and the fields `given` (None: the engine's setting, else the
        declaration's default)."""
        given = {k: v for k, v in given.items() if v is not None}
        return GenerationRequest(**{**self.defaults, "prompt": prompt, "composition": composition, **given})

    def check(self, request: GenerationRequest | str, composition: Composition | str | None = None, **given) -> None:
        """What `generate` would refuse of `request` (or of the request `self.request(request, composition,
        **given)` makes), found without generating: a ValueError (or CompositionError) naming the problem, so
        a server can answer at once instead of failing a queued job later."""
        if not isinstance(request, GenerationRequest):
            request = self.request(request, composition, **given)
        request = self.pipe.resolved(request)
        pool = None
        if request.composition is not None:
            bound = self.pipe.bind(request.prompt, request.composition, request.max_sequence_length)
            if len(bound.tokens) > self.max_composition_tokens:
                raise ValueError(
                    f"the composition needs {len(bound.tokens)} prompt tokens; this engine was built "
                    f"for at most {self.max_composition_tokens}"
                )
            pool = self.pipe.guidance.pool
        if request.guide_steps is not None:
            replace(self.pipe.guidance, guide_steps=request.guide_steps).check(request.num_inference_steps)
        self.pipe.check_inputs(request, None, pool)

    def generate(
        self,
        prompt: str,
        composition: Composition | str | None = None,
        seed: int = 0,
        output_type: str = "np",
        *,
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        **given,
    ) -> CVGOutput:
        """One video with the engine's settings but those `given` (`GenerationRequest` fields); safe to call
        from several threads (calls run one at a time). `on_step(i, t, latents)` sees every denoising step: an
        exception it raises ends the generation there, with nothing decoded."""
        return self.generate_batch(
            [self.request(prompt, composition, seed=seed, **given)], output_type, on_step=on_step
        )

    def generate_batch(
        self,
        requests: list[GenerationRequest | dict],
        output_type: str = "np",
        *,
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> CVGOutput:
        """Several requests of the same settings (`GenerationRequest.settings`) as one denoising run, each
        guided to its own composition (all guided or none). Item i of the output is the request run alone to
        float rounding (batched matmuls round apart). A dict stands for `self.request(**item)`."""
        requests = [r if isinstance(r, GenerationRequest) else self.request(**r) for r in requests]
        for request in requests:
            self.check(request)
        if len({r.settings() for r in requests}) > 1:
            raise ValueError("a batch's requests must share their settings (size, steps, scales, guidance)")
        if len({r.composition is None for r in requests}) > 1:
            raise ValueError("a batch is guided for every item or for none")
        call = {k: v for k, v in asdict(requests[0]).items() if k not in BATCH_ITEM_FIELDS}
        items = {
            "prompt": [r.prompt for r in requests],
            "composition": None if requests[0].composition is None else [r.composition for r in requests],
            "negative_prompt": [r.negative_prompt or "" for r in requests],  # WanPipeline's default negative
            "generator": [torch.Generator().manual_seed(r.seed) for r in requests],
        }
        if len(requests) == 1:  # one request: as a direct call makes it
            items = {
                **{k: v if v is None else v[0] for k, v in items.items()},
                "negative_prompt": requests[0].negative_prompt,
            }
        with self._lock, pinned_threads(self.threads):
            return self.pipe(**items, output_type=output_type, on_step=on_step, **call)
