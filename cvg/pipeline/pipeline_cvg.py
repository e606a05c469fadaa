"""`CVGPipeline`: wrap a diffusers `WanPipeline` or `CogVideoXPipeline` and generate with compositional guidance.

pipe = cvg.CVGPipeline.from_pretrained("path/to/wan")            # or cvg.CVGPipeline(wan_pipe)
out = pipe("a red cube to the left of a blue ball", composition="red cube left of blue ball",
           guide_steps=2, guidance_strength=0.1, generator=torch.Generator().manual_seed(0))
out.frames, out.maps, out.objective_values
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor

from cvg.guidance.binding import BoundBatch, BoundComposition
from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import GEOMETRIC_KINDS, ItemwiseObjective, Objective, SumObjective, objective_for
from cvg.guidance.sampler import Denoiser, GuidedStep, denoise, select_noise
from cvg.models.caching import cached_after, step_cache
from cvg.models.families import directory_adapter, pipeline_adapter
from cvg.models.wan import generator_description, video_size
from cvg.pipeline.checks import check_request
from cvg.pipeline.steps import StepBuilder
from cvg.pipeline.text import PromptEncoder
from cvg.request import (
    PIPELINE_ALIASES,
    REQUEST_FIELDS,
    GenerationRequest,
    PipelineOptions,
    with_deprecated,
)


@dataclass
class CVGOutput:
    frames: object  # as diffusers' output_type gives it: np.ndarray [B, F, H, W, 3], list of PIL, or latents
    maps: list[torch.Tensor] = field(default_factory=list)  # per guided update: [B, layers, heads, f, h, w, T]
    objective_values: list[torch.Tensor] = field(default_factory=list)  # per guided update: [B]
    steps: list[GuidedStep] = field(default_factory=list)
    composition: BoundComposition | BoundBatch | None = None  # a BoundBatch where each prompt had its own
    candidate_scores: torch.Tensor | None = None  # [candidates, B] objective of each initial noise, when chosen
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of this call


class CVGPipeline:
    """Compositional guidance around a diffusers `WanPipeline` (Wan 2.1, Wan 2.2 A14B with two experts split
    at `boundary_ratio`, Wan 2.2 TI2V-5B with `expand_timesteps`) or `CogVideoXPipeline`, text-to-video.
    What differs between them is in their adapter (`cvg.models.families`)."""

    def __init__(
        self,
        pipe,
        objective: Objective | None = None,
        guidance: GuidanceConfig | None = None,
        options: PipelineOptions | None = None,
        *,
        cache: object | None = None,
        **deprecated,
    ):
        """`options` (`cvg.request.PipelineOptions`) say how steps run: `step_backend` runs the gradient-free
        transformer forwards on a `cvg.runtime.step_backend` backend, built once per shape and kept (None: eager
        diffusers); `batch_cfg` runs the conditional and unconditional forwards of a step as one batch of two
        (None: as the wrapped pipeline runs them); a step cache applies to the unguided steps after the guided
        ones. `cache` is any diffusers cache config (`FirstBlockCacheConfig`, `MagCacheConfig`, ...) in place of
        the options' step cache (`cvg.models.caching`). The loading options (dtypes, classifier) are
        `from_pretrained`'s. `engine`, `engine_cache` and `batch_cfg` are deprecated names of the options'."""
        self.adapter = pipeline_adapter(pipe)
        if pipe.transformer is None:
            raise ValueError("CVGPipeline needs the pipeline's transformer (Wan 2.2's high-noise expert); it is None")
        if getattr(pipe.config, "boundary_ratio", None) is not None and pipe.transformer_2 is None:
            raise ValueError(
                f"a two-expert Wan 2.2 pipeline (boundary_ratio={pipe.config.boundary_ratio}) needs transformer_2, "
                "its low-noise expert; it is None"
            )
        self.pipe, self.objective = pipe, objective
        self.guidance = guidance or GuidanceConfig()
        options = with_deprecated(options or PipelineOptions(), deprecated, PIPELINE_ALIASES, "CVGPipeline")
        options.check()
        if options.step_backend == "eager":  # diffusers' own forwards, as None
            options = replace(options, step_backend=None)
        if cache is not None and options.step_backend is not None:
            raise ValueError(
                f"cache runs on eager diffusers forwards; step_backend={options.step_backend!r} bypasses its hooks"
            )
        if (
            options.batch_cfg is None
        ):  # as the wrapped pipeline runs them: WanPipeline two forwards, CogVideoX one batch
            options = replace(options, batch_cfg=self.adapter.batched_cfg)
        self.options, self.cache = options, cache if cache is not None else step_cache(options)
        self.steps = StepBuilder(pipe, self.adapter, options)  # denoisers, with the step backends and graphs kept
        self.encode_prompt = PromptEncoder(pipe, self.adapter)  # WanPipeline.encode_prompt, recent prompts kept
        self.classifier_expert: str | None = None  # which expert a loaded classifier reads (`load_classifier`)
        self._objectives: dict[str, Objective] = {}  # training-free ones per composition kind, kept

    @property
    def family(self) -> str:
        """The layout of the wrapped pipeline (`cvg.models.families`): wan2.1, wan2.2-a14b, wan2.2-ti2v or
        cogvideox."""
        return self.adapter.name(self.pipe)

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        """The transformers that denoise, by component name: `transformer`, and for a two-expert Wan 2.2
        pipeline `transformer_2` (its low-noise expert; WanPipeline ignores one without `boundary_ratio`)."""
        return self.adapter.experts(self.pipe)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        objective: Objective | None = None,
        options: PipelineOptions | None = None,
        guidance: GuidanceConfig | None = None,
        **kwargs,
    ) -> CVGPipeline:
        """Load a local diffusers Wan or CogVideoX directory (no hub access), its family read from
        `model_index.json`, with `options` (`cvg.request.PipelineOptions`: dtypes, step backend, classifier,
        ...); `kwargs` go to `load_wan_pipeline` or `load_cogvideox_pipeline` (diffusers' own; a torch dtype
        as `transformer_dtype` or `vae_dtype` stands in for the options' name of it)."""
        path, options = Path(path), options or PipelineOptions()
        options.check()
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        adapter = directory_adapter(path)  # an unsupported pipeline or a missing expert: one line, before loading
        for name in ("transformer_dtype", "vae_dtype"):
            kwargs.setdefault(name, getattr(torch, getattr(options, name)))
        try:
            pipe = adapter.load(path, **kwargs)
        except Exception as e:  # a torn weight file, a config that misses fields, ...: say which, in one line
            raise ValueError(f"cannot load the {adapter.label} in {str(path)!r}: {type(e).__name__}: {e}") from e
        loaded = cls(pipe, objective, guidance, options)
        if options.classifier is not None:
            loaded.load_classifier(options.classifier)
        return loaded

    @property
    def engine(self) -> str | None:
        """Deprecated: `options.step_backend`."""
        warnings.warn("CVGPipeline.engine is options.step_backend", DeprecationWarning, stacklevel=2)
        return self.options.step_backend

    @property
    def batch_cfg(self) -> bool:
        """Deprecated: `options.batch_cfg`."""
        warnings.warn("CVGPipeline.batch_cfg is options.batch_cfg", DeprecationWarning, stacklevel=2)
        return self.options.batch_cfg

    def load_classifier(self, directory: str | Path) -> None:
        """Guide with a trained compositional classifier (`cvg train-classifier`) from now on; it must have
        been trained on the maps of this generator (of one of its experts), recorded as `self.guidance`
        records them. Guided steps must then run on that expert."""
        from cvg.guidance.classifier import ClassifierObjective

        mismatch = None
        for name, model in self.experts.items():
            description = generator_description(model, self.guidance.layers, self.guidance.pool)
            try:
                self.objective = ClassifierObjective.from_pretrained(directory, description)
            except ValueError as e:
                mismatch = mismatch or e
                continue
            self.classifier_expert = name
            return
        raise mismatch

    def bind(self, prompt: str | list[str], composition: Composition | str, max_sequence_length: int | None = None):
        """The composition tied to the prompts as the pipeline tokenizes them (Wan cleans prompts first), padded
        to `max_sequence_length` (default: the family's)."""
        if max_sequence_length is None:
            max_sequence_length = self.adapter.text_length
        if isinstance(composition, str):
            composition = Composition.parse(composition)
        prompts = [self.adapter.clean_prompt(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        return composition.bind(self.pipe.tokenizer, prompts, max_sequence_length)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        composition: Composition | str | list[Composition | str] | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        guide_steps: int | None = None,
        guidance_strength: float | None = None,
        iterations: int | None = None,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> CVGOutput:
        """Generate as the wrapped pipeline's `__call__` does, guided in the first steps toward `composition`
        (None: unguided, the wrapped pipeline's loop op for op; a list: one per prompt, each guided to its own).

        Args:
            prompt ... max_sequence_length: a `cvg.request.GenerationRequest`'s fields (each one's help there).
            generator, latents, output_type: as in diffusers' `WanPipeline.__call__`.
            on_step: `on_step(i, t, latents)` after each denoising step; an exception it raises ends the call
                there, with nothing decoded.
        """
        request = GenerationRequest(**{k: v for k, v in locals().items() if k in REQUEST_FIELDS})
        marks = [time.perf_counter()]  # phase boundaries: start, text encoded, each step done, decoded
        # 1. Check inputs, set the schedule and this call's guidance window on it
        request = self.resolved(request)
        config, solver = self._schedule(request, generator)
        guided = request.composition is not None and config.guide_steps > 0
        self.check_inputs(request, latents, config.pool if guided else None)
        # 2. Bind the composition to the prompts' tokens and choose the objective that guides it
        bound, objective = self._bind_request(request, config) if guided else (None, None)
        config = self._bounded(config, objective)
        # 3. Encode the prompts
        prompt_embeds, negative_embeds = self._encode(request)
        marks.append(time.perf_counter())
        # 4. Prepare the latents (chosen among candidates by the objective) and each expert's denoiser
        latents, denoiser, scores = self._prepared(
            request, prompt_embeds, negative_embeds, generator, latents, objective, bound, config
        )
        # 5. Denoise
        latents, history = self._denoise(denoiser, solver, latents, objective, bound, config, marks, on_step)
        # 6. Decode
        frames = latents
        if output_type != "latent":
            frames = self.adapter.decode(self.pipe, latents, request.num_frames, output_type)
        marks.append(time.perf_counter())
        self.pipe.maybe_free_model_hooks()
        timings = _timings(marks, config.guide_steps if objective is not None else 0)
        maps, values = [s.maps for s in history], [s.loss for s in history]
        return CVGOutput(frames, maps, values, history, bound, scores, timings)

    def resolved(self, request: GenerationRequest) -> GenerationRequest:
        """`request` checked (`GenerationRequest.check`), with the size and text length it leaves None
        taken from the model: the size a cvg-trained model records, else the family's, and its text length."""
        request.check()
        path = self.pipe.config.get("_name_or_path", "") or ""
        size = video_size(path, request.height, request.width, request.num_frames, self.adapter.default_size)
        length = request.max_sequence_length
        return replace(request, **size, max_sequence_length=self.adapter.text_length if length is None else length)

    def _schedule(self, request: GenerationRequest, generator) -> tuple[GuidanceConfig, object]:
        """This call's guidance config (the request's overrides, the window fitted to the schedule, checked)
        and the solver, after the scheduler's timesteps are set."""
        steps = request.num_inference_steps
        overrides = {"guide_steps": request.guide_steps, "strength": request.guidance_strength}
        overrides["iterations"] = request.iterations
        config = replace(self.guidance, **{k: v for k, v in overrides.items() if v is not None})
        if request.guide_steps is not None:  # asked for by number: not by noise level
            config = replace(config, guide_sigma=None)
        else:  # the configured window, on a schedule shorter than it: every step
            config = replace(config, guide_steps=min(config.guide_steps, steps))
        config.check(steps)
        self.pipe.scheduler.set_timesteps(steps, device=self.pipe._execution_device)
        solver = self.adapter.solver(self.pipe, generator)  # the scheduler, behind the step call the sampler makes
        if config.guide_sigma is not None:  # the window by noise level: every step at or above it
            config = replace(config, guide_steps=int((solver.sigmas[:-1] >= config.guide_sigma).sum()))
        return config, solver

    def _bind_request(self, request: GenerationRequest, config: GuidanceConfig):
        """The composition bound to the prompts, and its objective; a list of compositions binds one per
        prompt, each item guided to its own."""
        prompt, composition, length = request.prompt, request.composition, request.max_sequence_length
        if not isinstance(composition, list | tuple):
            bound = self.bind(prompt, composition, length)
            return bound, self.guiding_objective(bound.composition.kind, config)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(composition) != len(prompts) or request.num_videos_per_prompt != 1:
            raise ValueError(
                f"a list of compositions needs one per prompt and num_videos_per_prompt 1; got {len(composition)} "
                f"for {len(prompts)} prompts, {request.num_videos_per_prompt} videos each"
            )
        items = [self.bind(p, c, length) for p, c in zip(prompts, composition, strict=True)]
        objective = ItemwiseObjective([self.guiding_objective(item.composition.kind, config) for item in items])
        return BoundBatch.of(items), objective

    def _encode(self, request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode_prompt(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            do_classifier_free_guidance=request.guidance_scale > 1.0,
            num_videos_per_prompt=request.num_videos_per_prompt,
            max_sequence_length=request.max_sequence_length,
            device=self.pipe._execution_device,
        )

    def _prepared(self, request, prompt_embeds, negative_embeds, generator, latents, objective, bound, config):
        """The initial latents (chosen among `config.candidates` noises by the objective, with every
        candidate's score), and the first expert's denoiser, built whole."""
        size = (request.height, request.width, request.num_frames)
        device = self.pipe._execution_device
        latents = self.adapter.prepare_latents(self.pipe, prompt_embeds.shape[0], *size, device, generator, latents)
        scales = (request.guidance_scale, request.guidance_scale_2)
        experts = self.steps.denoisers(prompt_embeds, negative_embeds, latents, *scales)
        scores = None
        if objective is not None and config.candidates > 1:
            latents, scores = self._chosen_noise(experts["transformer"], latents, objective, bound, config, generator)
        reader = self.classifier_expert if self.objective is not None else None  # the classifier's expert
        return latents, self.steps.built(experts, latents, objective, bound, config, reader), scores

    def _bounded(self, config: GuidanceConfig, objective: Objective | None) -> GuidanceConfig:
        """With `config.bounded` and no target of its own: the objective's target loss, if it has one (per
        item, `[B]`, for an itemwise objective)."""
        if objective is None or config.target_loss is not None or not config.bounded:
            return config
        target = getattr(objective, "target_loss", None)
        return replace(
            config, target_loss=target.to(self.pipe._execution_device) if torch.is_tensor(target) else target
        )

    def _chosen_noise(self, denoiser: Denoiser, latents, objective, bound, config, generator) -> tuple:
        """Of `config.candidates` initial noises (`latents` the first), per item the one the objective
        scores best at the first timestep, and every candidate's score."""
        noises = [latents] + [
            randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            for _ in range(config.candidates - 1)
        ]
        first = self.pipe.scheduler.timesteps[0]
        return select_noise(denoiser.experts_for(first.view(1))[0], noises, first, objective, bound, config)

    def _denoise(self, denoiser: Denoiser, solver, latents, objective, bound, config, marks: list, on_step):
        """The sampler's loop, with the step cache (`self.cache`) on the unguided steps after the guided ones,
        a mark each step, and a check that the latents stay finite."""
        timesteps = self.pipe.scheduler.timesteps
        guided_steps = config.guide_steps if objective is not None else 0  # also the first step a cache may serve
        served = denoiser.experts_for(timesteps)
        with ExitStack() as caches:
            cache_steps = [
                caches.enter_context(
                    cached_after(
                        model, self.cache, guided_steps, sum(s.transformer is model for s in served[guided_steps:])
                    )
                )
                for model in self.experts.values()
            ]

            def step_done(i, t, x):
                marks.append(time.perf_counter())
                if not torch.isfinite(x).all():  # one sync a step: a NaN never reaches the video unnoticed
                    raise FloatingPointError(
                        f"the latents became non-finite at denoising step {i} (timestep {float(t):g}); "
                        "nothing was decoded"
                    )
                for cache_step in cache_steps:
                    cache_step(i)
                if on_step is not None:
                    on_step(i, t, x)

            progress = self._progress
            return denoise(denoiser, solver, latents, timesteps, objective, bound, config, step_done, progress)

    def guiding_objective(self, kind: str, config: GuidanceConfig) -> Objective:
        """The objective for a composition kind: the loaded classifier (with the kind's training-free
        objective added where it measures the composition itself and `config.geometric`), else the
        training-free one (kept per kind)."""
        training_free = self._objectives.setdefault(kind, objective_for(kind))
        if self.objective is None:
            return training_free
        if config.geometric and kind in GEOMETRIC_KINDS:
            return SumObjective(self.objective, training_free)
        return self.objective

    def check_inputs(
        self, request: GenerationRequest, latents: torch.Tensor | None = None, pool: tuple[int, int, int] | None = None
    ) -> None:
        """What this model refuses of a resolved request (`resolved`; `cvg.pipeline.checks.check_request`), and
        a step backend or cache on a family that runs eager forwards only."""
        if not self.adapter.step_engines and (self.options.step_backend is not None or self.cache is not None):
            raise ValueError(f"{self.family} runs eager forwards: step backends and caches are for Wan pipelines")
        check_request(self.pipe, self.adapter, request, latents, pool)

    def _progress(self, iterable, total: int):
        with self.pipe.progress_bar(total=total) as bar:
            for item in iterable:
                yield item
                bar.update()


def _timings(marks: list[float], guided_steps: int) -> dict[str, float]:
    """Seconds per phase, from the marks at the start, after text encoding, after each step and after
    decoding."""
    guided = 1 + guided_steps  # index of the last guided step's mark
    return {
        "text_encoding": marks[1] - marks[0],
        "guided_steps": marks[guided] - marks[1],
        "unguided_steps": marks[-2] - marks[guided],
        "vae_decode": marks[-1] - marks[-2],
    }
