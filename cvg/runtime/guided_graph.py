"""Guided steps over static tensors: captured once as a CUDA graph, replayed each step and request.

    graph = GuidedStepGraph(denoiser, objective, bound, config, latents, t)  # warm-up and capture here
    new_latents, loss, maps, skipped = graph(latents, t)                     # a replay; eager off CUDA

A guided step (`cvg.guidance.sampler.latent_update`: forward with recording processors, objective, backward to
the latent, update) reads only tensors that live here and are refilled in place: the latents and the
timestep every call, the prompt's text rows and key bias once per request (`load`). The recorder's
token indices and pooling, the composition's entity weights and the classifier's label embedding are
made during warm-up and kept. The step makes no host synchronisation and copies nothing from the host
(tests/runtime/test_guided_graph.py checks both on CPU by the ops it dispatches), which is what CUDA-graph
capture needs. One graph serves one latent shape, text length, composition, objective and config
(`graph_key`); `cvg.pipeline.CVGPipeline` keeps a few, built with its step backends.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cvg.guidance.binding import BoundComposition
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import Objective
from cvg.guidance.sampler import Denoiser, latent_update
from cvg.models.padding import collapse_padding, padded_length

WARMUP_STEPS = 3  # on a side stream before capture, as torch.cuda.graphs asks: lazy inits, allocator pools


def graph_key(
    denoiser: Denoiser, objective: Objective, bound: BoundComposition, config: GuidanceConfig, latents: torch.Tensor
) -> str:
    """What a graph is specialised to; requests with the same key replay the same graph."""
    text_rows = padded_length(denoiser.prompt_embeds) if config.collapse_padding else denoiser.prompt_embeds.shape[1]
    return repr(
        (
            id(denoiser.transformer),  # Wan 2.2: each expert its own graph
            tuple(latents.shape),
            latents.dtype,
            latents.device,
            tuple(denoiser.prompt_embeds.shape),
            text_rows,
            bound.composition,
            bound.tokens.tolist(),
            bound.columns,
            bound.nouns,
            id(objective),
            config,
        )
    )


class GuidedStepGraph:
    """One guided latent update over static tensors; a CUDA graph on CUDA, the same code eagerly elsewhere."""

    def __init__(
        self,
        denoiser: Denoiser,
        objective: Objective,
        bound: BoundComposition,
        config: GuidanceConfig,
        latents: torch.Tensor,
        t: torch.Tensor,
    ):
        self.denoiser = replace(denoiser, backend=None, graph=None)  # its transformer; text comes from `inputs`
        self.objective, self.bound, self.config = objective, bound, config
        rows = padded_length(denoiser.prompt_embeds) if config.collapse_padding else None
        self.inputs = denoiser.prepare(bound, config, rows)
        self.inputs.text = self.inputs.text.clone()  # own storage, refilled per request
        self.latents, self.t = latents.detach().clone(), t.detach().clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        if latents.device.type == "cuda":
            self._capture()

    def _step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return latent_update(self.denoiser, self.latents, self.t, self.objective, self.bound, self.config, self.inputs)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy state (pooling, entity weights, label embedding) is made here
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._step()

    def load(self, denoiser: Denoiser) -> None:
        """Refill the text rows and key bias from another request with this graph's key."""
        embeds = denoiser.prompt_embeds
        if self.config.collapse_padding:
            text, key_bias = collapse_padding(embeds, self.inputs.text.shape[1])
            self.inputs.recorder.key_bias.copy_(key_bias)
        else:
            text = embeds
        self.inputs.text.copy_(text)

    def __call__(
        self, latents: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(new latents, loss [B], maps, skipped [B]) at `latents` and timestep `t`, as `latent_update`."""
        self.latents.copy_(latents)
        self.t.copy_(t)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return tuple(x.clone() for x in self.outputs)  # the graph's outputs are overwritten by the next replay
