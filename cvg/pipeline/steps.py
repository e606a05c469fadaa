"""What runs a request's denoising steps: each expert's `Denoiser`, built whole, with its step backend (built
once per shape and kept) and, where it guides, its guided-step graph (kept per shape and composition)."""

from __future__ import annotations

from dataclasses import replace

import torch

from cvg.guidance.binding import BoundComposition
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import Objective
from cvg.guidance.sampler import Denoiser
from cvg.models.families import Adapter
from cvg.request import PipelineOptions
from cvg.runtime.backends import build_backend
from cvg.runtime.guided_graph import GuidedStepGraph, graph_key
from cvg.runtime.step_backend import StepBackend, StepShape

MAX_GRAPHS = 8  # guided-step graphs kept per pipeline (shape x composition); each holds its own buffers


class StepBuilder:
    """Builds the denoisers of one wrapped pipeline, keeping its step backends and guided-step graphs."""

    def __init__(self, pipe, adapter: Adapter, options: PipelineOptions):
        self.pipe, self.adapter, self.options = pipe, adapter, options
        self.backends: dict[tuple[str, str, StepShape], StepBackend] = {}
        self.graphs: dict[str, GuidedStepGraph] = {}  # most recent last

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        return self.adapter.experts(self.pipe)

    def denoisers(
        self,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        latents: torch.Tensor,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
    ) -> dict[str, Denoiser]:
        """Per expert, what a step at `latents` runs: its transformer, the texts in its dtype (WanPipeline's
        rule: both experts get them in the first one's), its CFG scale and the family's other inputs. A
        two-expert pipeline's `transformer` hands the timesteps below the boundary to `transformer_2`."""
        pipe = self.pipe
        dtype = pipe.transformer.dtype
        scales = {"transformer": guidance_scale, "transformer_2": guidance_scale_2}
        if guidance_scale_2 is None:
            scales["transformer_2"] = guidance_scale
        experts: dict[str, Denoiser] = {}
        for name, model in reversed(self.experts.items()):  # the low-noise expert first: the other holds it
            low_noise = experts.get("transformer_2") if name == "transformer" else None
            experts[name] = Denoiser(
                model,
                prompt_embeds.to(dtype),
                None if negative_embeds is None else negative_embeds.to(dtype),
                scales[name],
                batch_cfg=self.options.batch_cfg,
                token_timesteps=getattr(pipe.config, "expand_timesteps", False),
                low_noise=low_noise,
                boundary=None
                if low_noise is None
                else pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps,
                forward_kwargs=self.adapter.forward_kwargs(pipe, latents),
            )
        return {name: experts[name] for name in self.experts}

    def built(
        self, experts: dict[str, Denoiser], latents, objective, bound, config, classifier_expert: str | None
    ) -> Denoiser:
        """The first expert's denoiser, every expert built whole: with its step backend (`options.step_backend`)
        and, where it guides, its guided-step graph; a two-expert pipeline's first one holds the second.
        `classifier_expert`: the expert whose maps the guiding classifier reads (None: any)."""
        timesteps = self.pipe.scheduler.timesteps
        guided_steps = config.guide_steps if objective is not None else 0
        served = experts["transformer"].experts_for(timesteps)
        guiding = {name for name, d in experts.items() if any(s is d for s in served[:guided_steps])}
        if classifier_expert is not None and guiding - {classifier_expert}:
            raise ValueError(
                f"the classifier reads {classifier_expert}'s maps, but guided steps run on "
                f"{', '.join(sorted(guiding - {classifier_expert}))} (Wan 2.2 switches experts at timestep "
                f"{experts['transformer'].boundary:g}); guide fewer steps"
            )
        if self.options.step_backend is None:
            return experts["transformer"]
        built: dict[str, Denoiser] = {}
        for name in reversed(list(experts)):  # the low-noise expert first: the high-noise one holds it
            expert = experts[name]
            if expert.low_noise is not None:
                expert = replace(expert, low_noise=built["transformer_2"])
            if expert.cfg_embeds is not None:  # the backend serves the doubled batch
                backend = self._step_backend(torch.cat([latents, latents]), expert.cfg_embeds, expert=name)
            else:
                texts = [e for e in (expert.prompt_embeds, expert.negative_prompt_embeds) if e is not None]
                backend = self._step_backend(latents, *texts, expert=name)
            graph = None
            if name in guiding:
                t = timesteps[next(i for i, s in enumerate(served) if s is experts[name])]
                graph = self._guided_graph(expert, objective, bound, config, latents, t)
            built[name] = replace(expert, backend=backend, graph=graph)
        return built["transformer"]

    def _step_backend(
        self, latents: torch.Tensor, *text_embeds: torch.Tensor, expert: str = "transformer"
    ) -> StepBackend:
        """The step backend of one expert for this shape and every given text, built on first use (`cvg export`
        builds its cache ahead of time)."""
        model = self.experts[expert]
        backend = self.options.step_backend
        key = (backend, expert, StepShape.of(latents.to(model.dtype), *text_embeds))
        if key not in self.backends:
            self.backends[key] = build_backend(model, key[2], backend, self.options.backend_cache)
        return self.backends[key]

    def _guided_graph(
        self,
        denoiser: Denoiser,
        objective: Objective,
        bound: BoundComposition,
        config: GuidanceConfig,
        latents: torch.Tensor,
        t: torch.Tensor,
    ) -> GuidedStepGraph:
        """The guided-step graph for this request's shape and composition: built (captured on CUDA) on first
        use, else reloaded with this request's text. The `MAX_GRAPHS` most recent are kept."""
        key = graph_key(denoiser, objective, bound, config, latents)
        graph = self.graphs.pop(key, None)
        if graph is None:
            graph = GuidedStepGraph(denoiser, objective, bound, config, latents, t)
        else:
            graph.load(denoiser)
        self.graphs[key] = graph
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.pop(next(iter(self.graphs)))
        return graph
