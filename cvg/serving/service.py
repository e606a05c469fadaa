"""`Engine`: a model served at one video shape, built once, then called per request from any thread.

    engine = Engine("models/compshapes-wan", backend="auto")  # at the 64x64x17 the model was trained for
    video = engine.generate("a red cube to the left of a blue ball", "red cube left of blue ball", seed=0)

Building exports or loads the step engine for the shape (see `cvg.runtime.step_engine`) and runs one guided warm-up
generation, so the first request pays no build cost. Requests are serialised by a lock: the pipeline's
scheduler and the step engine's buffers are shared state, and interleaving them would corrupt both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig
from cvg.models.wan import video_size
from cvg.pipeline import CVGOutput, CVGPipeline
from cvg.threads import pinned_threads, thread_count

WARMUP_PROMPT, WARMUP_COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"


@dataclass(frozen=True)
class EngineConfig:
    height: int
    width: int
    num_frames: int
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    max_sequence_length: int = 512
    max_composition_tokens: int = 16  # per request; more is refused rather than silently truncated

    def with_overrides(self, **overrides) -> EngineConfig:
        """These settings with a request's `overrides` (None keeps the setting)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


class Engine:
    def __init__(
        self,
        model: str | Path | CVGPipeline,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        max_sequence_length: int = 512,
        max_composition_tokens: int = 16,
        guidance: GuidanceConfig | None = None,
        classifier: str | Path | None = None,
        backend: str | None = "auto",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        transformer_dtype: torch.dtype | None = None,
        batch_cfg: bool | None = None,
        vae_dtype: torch.dtype | None = None,
    ):
        """The size defaults to the one a cvg-trained model records (`cvg.pipeline.video_size`); `classifier`
        (a `cvg train-classifier` directory) guides with the learned classifier instead of the training-free
        objectives. Each request runs with `threads` intra-op threads (default `cvg.threads.thread_count()`),
        whichever thread calls it, so a request's pixels equal the sequential run's. `transformer_dtype`
        (e.g. torch.bfloat16) loads the transformer in that precision, `vae_dtype` the VAE (default float32);
        `batch_cfg` runs the two forwards of classifier-free guidance as one batch of two (`CVGPipeline`)."""
        pipe = (
            model
            if isinstance(model, CVGPipeline)
            else CVGPipeline.from_pretrained(model, transformer_dtype=transformer_dtype, vae_dtype=vae_dtype)
        )
        self.pipe = CVGPipeline(pipe.pipe, pipe.objective, guidance or pipe.guidance, backend, cache_dir, batch_cfg)
        self.pipe.pipe.set_progress_bar_config(disable=True)  # a server's stderr is for its own logs
        if classifier is not None:
            self.pipe.load_classifier(classifier)
        size = video_size(pipe.pipe.config.get("_name_or_path", ""), height, width, num_frames)
        self.config = EngineConfig(
            size["height"],
            size["width"],
            size["num_frames"],
            num_inference_steps,
            guidance_scale,
            max_sequence_length,
            max_composition_tokens,
        )
        self._lock = threading.Lock()
        self.threads = threads or thread_count()  # every request splits its sums the same way
        start = time.perf_counter()
        self.generate(WARMUP_PROMPT, WARMUP_COMPOSITION, seed=0)
        self.build_seconds = time.perf_counter() - start

    @property
    def backend(self) -> str:
        engines = list(self.pipe._engines.values())
        return engines[0].backend if engines else "torch (diffusers eager)"

    def settings(self, **overrides) -> EngineConfig:
        """The engine's call settings with a request's `overrides` (height, width, num_frames,
        num_inference_steps, guidance_scale; None keeps the engine's)."""
        return self.config.with_overrides(**overrides)

    def check(
        self,
        prompt: str,
        composition: Composition | str | None = None,
        negative_prompt: str | None = None,
        guide_steps: int | None = None,
        **overrides,
    ) -> None:
        """What `generate` would refuse, found without generating: a ValueError (or CompositionError) naming
        the problem, so a server can answer at once instead of failing a queued job later."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        c = self.settings(**overrides)
        pool = None
        if composition is not None:
            bound = self.pipe.bind(prompt, composition, c.max_sequence_length)
            if len(bound.tokens) > c.max_composition_tokens:
                raise ValueError(
                    f"the composition needs {len(bound.tokens)} prompt tokens; this engine was built "
                    f"for at most {c.max_composition_tokens}"
                )
            pool = self.pipe.guidance.pool
        if guide_steps is not None:
            replace(self.pipe.guidance, guide_steps=guide_steps).check(c.num_inference_steps)
        self.pipe.check_inputs(
            prompt,
            negative_prompt,
            c.height,
            c.width,
            c.num_frames,
            c.num_inference_steps,
            c.guidance_scale,
            1,
            c.max_sequence_length,
            None,
            pool,
        )

    def generate(
        self,
        prompt: str,
        composition: Composition | str | None = None,
        seed: int = 0,
        output_type: str = "np",
        *,
        negative_prompt: str | None = None,
        guide_steps: int | None = None,
        guidance_strength: float | None = None,
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        **overrides,
    ) -> CVGOutput:
        """One video, at the engine's shape unless `overrides` say otherwise (`settings`); safe to call from
        several threads (calls run one at a time). `on_step(i, t, latents)` sees every denoising step: an
        exception it raises ends the generation there, with nothing decoded."""
        self.check(prompt, composition, negative_prompt, guide_steps, **overrides)
        generator = torch.Generator().manual_seed(seed)
        guidance = {"guide_steps": guide_steps, "guidance_strength": guidance_strength}
        return self._run(prompt, composition, negative_prompt, generator, output_type, on_step, guidance, overrides)

    def generate_batch(
        self,
        items: list[dict],
        output_type: str = "np",
        *,
        guide_steps: int | None = None,
        guidance_strength: float | None = None,
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        **overrides,
    ) -> CVGOutput:
        """Several requests with the same settings as one denoising run: each item a dict of `prompt`,
        `composition`, `seed` and `negative_prompt`, guided to its own composition (all guided or none).
        Item i of the output is the request run alone to float rounding (batched matmuls round apart)."""
        for item in items:
            self.check(item["prompt"], item.get("composition"), item.get("negative_prompt"), guide_steps, **overrides)
        compositions = [item.get("composition") for item in items]
        if len({c is None for c in compositions}) > 1:
            raise ValueError("a batch is guided for every item or for none")
        prompts = [item["prompt"] for item in items]
        negatives = [item.get("negative_prompt") or "" for item in items]  # WanPipeline's default negative
        generators = [torch.Generator().manual_seed(item.get("seed", 0)) for item in items]
        guidance = {"guide_steps": guide_steps, "guidance_strength": guidance_strength}
        composition = None if compositions[0] is None else compositions
        return self._run(prompts, composition, negatives, generators, output_type, on_step, guidance, overrides)

    def _run(self, prompt, composition, negative_prompt, generator, output_type, on_step, guidance, overrides):
        c = self.settings(**overrides)
        with self._lock, pinned_threads(self.threads):
            return self.pipe(
                prompt,
                composition,
                negative_prompt=negative_prompt,
                height=c.height,
                width=c.width,
                num_frames=c.num_frames,
                num_inference_steps=c.num_inference_steps,
                guidance_scale=c.guidance_scale,
                max_sequence_length=c.max_sequence_length,
                output_type=output_type,
                generator=generator,
                on_step=on_step,
                **guidance,
            )
