"""The guided sampler: WanPipeline's denoising loop with CVG guidance in the first steps.

For each of the first `guide_steps` steps, up to `iterations` times: run the transformer on the latent
with recording processors (stopping after the last recorded block, since nothing later reaches the
loss), score the pooled maps with the objective, and move the latent down the gradient; an item whose
objective is already at `target_loss` is left where it is (the step is bounded: guidance never pushes
the objective past what its classifier was trained to be confident of). Then the step continues as in
diffusers: a gradient-free prediction (with classifier-free guidance when on) and the scheduler's step,
with solver history that cannot overwrite the guided latent (`guided_solver`). Later steps are
unguided. Each step runs on the expert WanPipeline would choose for its timestep (Wan 2.2 A14B: the
high-noise transformer, then the low-noise one; `Denoiser.experts_for`). With no guided step this is
WanPipeline's loop, op for op. Before the loop, the pipeline may
choose the initial noise among several by the same objective (`select_noise`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

from cvg.guidance.activations import checkpointing, frozen, should_checkpoint
from cvg.guidance.binding import BoundComposition
from cvg.guidance.config import MAX_RECURRENCE, GuidanceConfig
from cvg.guidance.objectives import Objective
from cvg.models.context_parallel import reduce_gradient
from cvg.models.families import transformer_adapter
from cvg.models.padding import collapse_padding
from cvg.models.processors import resolve_layers, transformer_blocks


@dataclass
class GuidedInputs:
    """What guided forwards read besides latents and timestep (`Denoiser.prepare`)."""

    text: torch.Tensor  # prompt embeddings, zero padding collapsed unless the config says not to
    recorder: object  # the family's map recorder: token indices, pooling (and Wan's key bias)
    layers: list[int]
    read_noise: torch.Tensor | None = None  # `read_sigma`'s fixed noise, drawn at the first read


@dataclass
class GuidedStep:
    step: int
    iteration: int
    loss: torch.Tensor  # [B] objective before this update
    maps: torch.Tensor  # [B, layers, heads, frames, h, w, T] the maps it was computed from
    skipped: torch.Tensor  # [B] bool: non-finite gradient, update skipped


class _StopForward(Exception):
    """Raised after the last recorded block: the rest of the network cannot change the loss."""


def _stop_after(block: torch.nn.Module):
    def hook(module, args, output):
        raise _StopForward

    return block.register_forward_hook(hook)


def _step(grad: torch.Tensor, loss: torch.Tensor, config: GuidanceConfig) -> torch.Tensor:
    """The per-item latent step for a descent along `grad`. rms / max: `strength` times the gradient divided
    by its RMS / largest entry; none: `strength` times the raw gradient; polyak: the first-order step that
    takes the objective to `target_loss` (0 when unset), `(loss - target) / |grad|² · grad`, its RMS capped
    at `strength`, so a steep objective (a confident classifier) is moved only as far as it needs."""
    dims = tuple(range(1, grad.dim()))
    shape = (-1, *([1] * (grad.dim() - 1)))
    if config.normalize == "none":
        return config.strength * grad
    if config.normalize == "polyak":
        target = 0.0 if config.target_loss is None else config.target_loss  # a [B] tensor for itemwise objectives
        excess = (loss - target).clamp_min(0.0).view(shape)
        step = grad * excess / grad.square().sum(dims, keepdim=True).clamp_min(1e-30)
        rms = step.square().mean(dims, keepdim=True).sqrt()
        return step * (config.strength / rms.clamp_min(1e-30)).clamp(max=1.0)
    rms = config.normalize == "rms"
    scale = grad.square().mean(dims, keepdim=True).sqrt() if rms else grad.abs().amax(dims, keepdim=True)
    return config.strength * grad / scale.clamp_min(1e-20)


@dataclass
class Denoiser:
    """Everything one denoising step needs from the pipeline: its transformer, embeddings and CFG."""

    transformer: torch.nn.Module
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    guidance_scale: float
    attention_kwargs: dict | None = None
    backend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # step backend
    graph: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None  # guided steps; see cvg.runtime.guided_graph
    batch_cfg: bool = False  # the conditional and unconditional forwards as one batch of both texts
    token_timesteps: bool = False  # Wan 2.2 TI2V (`expand_timesteps`): eager forwards get a timestep per token
    low_noise: Denoiser | None = None  # Wan 2.2 A14B's low-noise expert: serves the timesteps below `boundary`
    boundary: float | None = None  # `boundary_ratio` x the scheduler's training timesteps
    forward_kwargs: dict = field(default_factory=dict)  # the family's other inputs (CogVideoX's rotary embeddings)
    cfg_embeds: torch.Tensor | None = field(init=False, default=None)  # that batch's text, built once

    def __post_init__(self) -> None:
        if self.batch_cfg and self.cfg:  # one tensor for every step: step backends find its padding once
            self.cfg_embeds = torch.cat([self.prompt_embeds, self.negative_prompt_embeds])

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: on when there is a negative text, as in WanPipeline (which encodes one
        when `guidance_scale > 1`, and then applies Wan 2.2's `guidance_scale_2` whatever its value)."""
        return self.negative_prompt_embeds is not None

    def experts_for(self, timesteps: torch.Tensor) -> list[Denoiser]:
        """Per step, the denoiser that serves its timestep, as `WanPipeline.__call__` chooses: the low-noise
        expert (its own transformer, guidance scale, step backend and guided graph) below the boundary, else this
        one. The timesteps are read on the host once, and only for two experts."""
        if self.low_noise is None:
            return [self] * len(timesteps)
        return [self if t >= self.boundary else self.low_noise for t in timesteps.tolist()]

    def timestep(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input at `latents`: `[B]`, or for TI2V `[B, tokens]` as WanPipeline
        builds it for text-to-video (every token at `t`)."""
        if not self.token_timesteps:
            return t.expand(latents.shape[0])
        return t.expand(latents.shape[0], transformer_adapter(self.transformer).video_tokens(self.transformer, latents))

    def predict(self, latents: torch.Tensor, t: torch.Tensor, step: int, sigma: float, total: int) -> torch.Tensor:
        """The noise prediction of WanPipeline for one step, classifier-free guidance included (in
        diffusers' order of operations, batched or not)."""
        latents = latents.to(self.transformer.dtype)
        context = {"step_index": step, "sigma": sigma, "num_inference_steps": total}
        if self.cfg and self.batch_cfg:
            both = torch.cat([latents, latents])
            noise, uncond = self._forward(both, t, self.cfg_embeds, "cfg", context).chunk(2)
            return uncond + self.guidance_scale * (noise - uncond)
        noise = self._forward(latents, t, self.prompt_embeds, "cond", context)
        if self.cfg:
            uncond = self._forward(latents, t, self.negative_prompt_embeds, "uncond", context)
            noise = uncond + self.guidance_scale * (noise - uncond)
        return noise

    def _forward(self, latents, t, embeds, label: str, context: dict) -> torch.Tensor:
        if self.backend is not None:  # one timestep per item: TI2V's per-token ones are all `t` in text-to-video
            return self.backend(latents, t.expand(latents.shape[0]), embeds)
        with self.transformer.cache_context(label, **context):
            return self.transformer(
                hidden_states=latents,
                timestep=self.timestep(latents, t),
                encoder_hidden_states=embeds,
                attention_kwargs=self.attention_kwargs,
                return_dict=False,
                **self.forward_kwargs,
            )[0]

    def prepare(self, bound: BoundComposition, config: GuidanceConfig, text_keys: int | None = None) -> GuidedInputs:
        """What guided forwards at any latents share: the text (zero padding collapsed to `text_keys` rows, by
        default as few as hold it, where the family pads with zeros) and its family's map recorder."""
        adapter = transformer_adapter(self.transformer)
        collapse = config.collapse_padding and adapter.zero_text_padding
        text, key_bias = collapse_padding(self.prompt_embeds, text_keys) if collapse else (self.prompt_embeds, None)
        recorder = adapter.map_recorder(self.transformer, bound.tokens, config.pool, config.backend, key_bias)
        return GuidedInputs(text, recorder, resolve_layers(self.transformer, config.layers))

    @contextmanager
    def _recorded(
        self, latents: torch.Tensor, t: torch.Tensor, inputs: GuidedInputs, config: GuidanceConfig, gradient: bool
    ) -> Iterator[torch.Tensor]:
        """Inside: the pooled maps `[B, layers, heads, f, h, w, T]` of a forward at `latents`, stopped after the
        last recorded block. Backward belongs inside too: gradient checkpointing recomputes the recorded
        blocks with their recording processors."""
        model = self.transformer
        through = len(transformer_blocks(model)) if config.read_sigma is not None else inputs.layers[-1] + 1
        with (
            torch.set_grad_enabled(gradient),
            transformer_adapter(model).recording(model, inputs.recorder, inputs.layers),
            checkpointing(model, gradient and should_checkpoint(model, config, latents, range(through))),
            frozen(model),
        ):
            if config.read_sigma is not None:  # the maps of the denoised estimate, re-noised
                latents, t = self._renoised_estimate(latents, t, inputs, config.read_sigma)
            stop = _stop_after(transformer_blocks(model)[inputs.layers[-1]])
            try:
                model(
                    hidden_states=latents.to(model.dtype),
                    timestep=self.timestep(latents, t),
                    encoder_hidden_states=inputs.text,
                    return_dict=False,
                    **self.forward_kwargs,
                )
            except _StopForward:
                pass
            finally:
                stop.remove()
            yield inputs.recorder.stacked().float()

    def _renoised_estimate(
        self, latents: torch.Tensor, t: torch.Tensor, inputs: GuidedInputs, sigma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's clean estimate at `latents`, x0 = x - s v (a full forward, differentiable), re-noised to
        `sigma` with a noise fixed per request (the same for every item and update), and its timestep. Run
        inside `recording`: the recorder's maps are cleared again by the forward that reads."""
        model = self.transformer
        if not transformer_adapter(model).flow:
            raise ValueError("read_sigma needs a flow-matching family (Wan); this transformer predicts otherwise")
        velocity = model(
            hidden_states=latents.to(model.dtype),
            timestep=self.timestep(latents, t),
            encoder_hidden_states=inputs.text,
            return_dict=False,
            **self.forward_kwargs,
        )[0]
        clean = latents - (t.float() / 1000) * velocity.to(latents.dtype)
        if inputs.read_noise is None or inputs.read_noise.shape != latents.shape[1:]:
            seeded = torch.Generator().manual_seed(0)
            inputs.read_noise = torch.randn(latents.shape[1:], generator=seeded, dtype=latents.dtype).to(latents.device)
        return (1 - sigma) * clean + sigma * inputs.read_noise, torch.full_like(t, sigma * 1000)

    def read_maps(
        self, latents: torch.Tensor, t: torch.Tensor, bound: BoundComposition, config: GuidanceConfig
    ) -> torch.Tensor:
        """The pooled maps of the composition's tokens at `latents` and timestep `t` (no gradient)."""
        with self._recorded(latents.detach(), t, self.prepare(bound, config), config, gradient=False) as maps:
            return maps

    def score(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        objective: Objective,
        bound: BoundComposition,
        config: GuidanceConfig,
        gradient: bool = False,
        inputs: GuidedInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Objective `[B]` and maps at `latents`; with `gradient`, also d(sum of the objective)/d latents.
        `inputs` (from `prepare`) may be kept across calls with the same text and composition."""
        latents = latents.detach().requires_grad_(gradient)
        with self._recorded(latents, t, inputs or self.prepare(bound, config), config, gradient) as maps:
            loss = objective(maps, bound, t)
            grad = reduce_gradient(self.transformer, torch.autograd.grad(loss.sum(), latents)[0]) if gradient else None
        return loss.detach(), maps.detach(), grad


def _warn_skipped(skipped: torch.Tensor) -> None:
    if skipped.any():
        warnings.warn(
            f"cvg: non-finite guidance gradient for batch items {skipped.nonzero().flatten().tolist()}; "
            "their update is skipped",
            RuntimeWarning,
            stacklevel=3,
        )


def latent_update(
    denoiser: Denoiser,
    latents: torch.Tensor,
    t: torch.Tensor,
    objective: Objective,
    bound: BoundComposition,
    config: GuidanceConfig,
    inputs: GuidedInputs | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of latent descent: returns (new latents, loss [B], maps, skipped [B]; items with a non-finite
    gradient keep their latents, and so do items already at `config.target_loss`, which are not counted as
    skipped). No host synchronisation, so it can be captured (`cvg.runtime.guided_graph`)."""
    loss, maps, grad = denoiser.score(latents, t, objective, bound, config, gradient=True, inputs=inputs)
    finite = torch.isfinite(grad).flatten(1).all(dim=1) & torch.isfinite(loss)
    move = finite if config.target_loss is None else finite & (loss > config.target_loss)
    step = _step(torch.nan_to_num(grad), torch.nan_to_num(loss), config)
    step = torch.where(move.view(-1, *([1] * (latents.dim() - 1))), step, 0.0)
    return (latents - step).detach(), loss, maps, ~finite


def select_noise(
    denoiser: Denoiser,
    noises: list[torch.Tensor],
    t: torch.Tensor,
    objective: Objective,
    bound: BoundComposition,
    config: GuidanceConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of several initial noises `[B, ...]` for the same items, per item the one whose objective at timestep
    `t` is lowest (the first on ties): returns (latents `[B, ...]`, objective `[K, B]`). One recorded
    forward per noise, without gradient, so it costs a fraction of one guided step."""
    inputs = denoiser.prepare(bound, config)
    losses = torch.stack([denoiser.score(x, t, objective, bound, config, inputs=inputs)[0] for x in noises])
    best = torch.nan_to_num(losses, nan=float("inf")).argmin(dim=0)
    return torch.stack(noises)[best, torch.arange(len(best))], losses


@contextmanager
def guided_solver(scheduler, guide_steps: int) -> Iterator[None]:
    """For the duration, a guided update made before any of the first `guide_steps` steps survives the
    solver. UniPC (Wan's scheduler) runs a corrector at the start of each step that rebuilds the current
    sample from the previous step's sample and model outputs: a change made to the latent between two steps
    is overwritten (with Wan's config only ~1-2% of it survives). The corrector is switched off, through
    diffusers' own `disable_corrector`, for the steps that start from a guided latent (1 .. guide_steps-1),
    so those steps run UniPC's predictor from the guided latent, and later steps correct from it. We chose
    this over re-basing the solver's history on the guided latent: it uses the scheduler's documented knob,
    is exact for any UniPC order, and costs only the corrector's accuracy on a few early, high-noise steps.
    Solvers without a corrector (DPM-Solver multistep, flow-match Euler) already step from the latent
    they are given; tests/guidance/test_sampler.py measures survival for all three."""
    corrector = getattr(scheduler, "disable_corrector", None)
    if corrector is None or guide_steps < 2:
        yield
        return
    scheduler.disable_corrector = sorted({*corrector, *range(guide_steps - 1)})
    try:
        yield
    finally:
        scheduler.disable_corrector = corrector


def denoise(
    denoiser: Denoiser,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    objective: Objective | None,
    bound: BoundComposition | None,
    config: GuidanceConfig,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: Callable | None = None,
) -> tuple[torch.Tensor, list[GuidedStep]]:
    """The denoising loop. `on_step(i, t, latents)` sees the latents after each scheduler step."""
    history: list[GuidedStep] = []
    total = len(timesteps)
    steps = progress(enumerate(timesteps), total) if progress else enumerate(timesteps)
    guided = config.guide_steps if objective is not None else 0
    served = denoiser.experts_for(timesteps)  # Wan 2.2: the expert of a step's timestep guides and denoises it
    with guided_solver(scheduler, guided):
        for i, t in steps:
            current = served[i]
            # A guided-step graph (cvg.runtime.guided_graph) stands for `latent_update` where the expert has one.
            update = current.graph or partial(latent_update, current, objective=objective, bound=bound, config=config)
            rounds = config.recurrence if i < guided else 1
            for round_ in range(rounds):
                if round_:  # self-recurrence: down one Euler step and back up to this step's noise level
                    latents = recurred(current, latents, t, i, scheduler.sigmas, total, round_)
                for it in range(config.iterations if i < guided else 0):
                    latents, loss, maps, skipped = update(latents, t)
                    _warn_skipped(skipped)
                    history.append(GuidedStep(i, it, loss, maps, skipped))
                    if config.target_loss is not None and it + 1 < config.iterations and _all_at_target(loss, config):
                        break
            with torch.no_grad():
                noise = current.predict(latents, t, i, float(scheduler.sigmas[i]), total)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i, t, latents)
    return latents, history


@torch.no_grad()
def recurred(
    denoiser: Denoiser, latents: torch.Tensor, t: torch.Tensor, i: int, sigmas, total: int, round_: int = 1
) -> torch.Tensor:
    """Universal Guidance's self-recurrence on the flow: the latent at sigma_i taken one Euler step down to
    sigma_{i+1} along the prediction, then re-noised back to sigma_i (x = (1 - s) x0 + s e, so the scale is
    (1 - s_i) / (1 - s_{i+1}) and the fresh noise makes up the variance). The noise depends on the step and
    round alone, not on the batch: an item's result is the same whatever it is batched with."""
    high, low = float(sigmas[i]), float(sigmas[i + 1])
    down = latents + (low - high) * denoiser.predict(latents, t, i, high, total)
    scale = (1 - high) / (1 - low)
    spread = max(high**2 - (scale * low) ** 2, 0.0) ** 0.5
    noise = torch.randn(
        latents.shape[1:], generator=torch.Generator().manual_seed(i * MAX_RECURRENCE + round_), dtype=latents.dtype
    )
    return scale * down + spread * noise.to(latents.device)


def _all_at_target(loss: torch.Tensor, config: GuidanceConfig) -> bool:
    """Whether every item's objective is at the target (one host read per iteration; the update itself
    stays capturable)."""
    return bool((loss <= config.target_loss).all())
