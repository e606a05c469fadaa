"""Step backends: the gradient-free transformer forward of the later denoising steps, at one fixed shape.

    backend = build_backend(pipe.transformer, StepShape.of(latents, prompt_embeds), "auto")  # cvg.runtime.backends
    noise = backend(latents, timestep, prompt_embeds)   # what the transformer returns, as a torch tensor

Backends (the first two here, each of the others in a module of its own, loaded when asked for; the registry
in `backends.py` says what each runs and refuses):
  torch        eager, the reference
  compiled     torch.compile (inductor; C++ on CPU, weights frozen into the graph), warmed up at build
  onnxruntime  onnx_backend.py: the transformer exported to ONNX once per (model, shape, dtype, opset),
               cached on disk, run by ONNX Runtime with the providers TensorRT -> CUDA -> CPU that it
               has, inputs and output bound to torch memory (no host copies)
  tensorrt     tensorrt_backend.py: a native TensorRT plan built from the same ONNX file (fp16/bf16,
               timing cache), cached on disk; CUDA only, never run where cvg is developed
Every backend drops Wan's zero text padding first, exactly (`cvg.models.padding`): the text attention runs over
`text_keys` keys (a multiple of 64) with an additive key bias instead of 512 keys. Prompts whose text
does not fit get a clear error; a longer-prompt shape builds its own engine.
`auto` tries tensorrt (CUDA only), onnxruntime, then torch; a backend that cannot load says why in one
line (a warning) and the next one is tried. Cache keys hash the weights, so a changed model never reuses
a stale file; each cached file's SHA-256 is recorded beside it when written, and a file whose content no
longer matches (torn, or bytes changed in place) is rebuilt, never run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cvg.models.padding import collapse_padding, padded_length
from cvg.models.processors import KeyBiasWanAttnProcessor, TextBias, text_key_bias


@dataclass(frozen=True)
class StepShape:
    """The one input shape an engine serves: latents [batch, channels, frames, height, width] (latent
    units) and text embeddings [batch, text_tokens, text_dim], of which the first `text_keys` rows are
    attended to (the rest must be Wan's zero padding)."""

    batch: int
    channels: int
    frames: int
    height: int
    width: int
    text_tokens: int
    text_dim: int
    dtype: str = "float32"
    text_keys: int = 0  # 0: all text_tokens

    @classmethod
    def of(cls, latents: torch.Tensor, *text_embeds: torch.Tensor) -> StepShape:
        """The shape of `latents` and text; text_keys fits every given text (conditional, negative, ...)."""
        if latents.dim() != 5 or any(t.dim() != 3 for t in text_embeds) or not text_embeds:
            raise ValueError(
                f"expected latents [B, C, F, H, W] and text [B, L, D], got {tuple(latents.shape)} "
                f"and {[tuple(t.shape) for t in text_embeds]}"
            )
        dtype = str(latents.dtype).removeprefix("torch.")
        keys = max(padded_length(t) for t in text_embeds)
        return cls(*latents.shape, *text_embeds[0].shape[1:], dtype=dtype, text_keys=keys)

    def check(self, latents: torch.Tensor, text_embeds: torch.Tensor) -> None:
        got = (tuple(latents.shape), tuple(text_embeds.shape), str(latents.dtype).removeprefix("torch."))
        if got != (self.latent_shape, self.text_shape, self.dtype) or text_embeds.dtype != latents.dtype:
            raise ValueError(
                f"this engine serves latents {self.latent_shape} and text {self.text_shape} in {self.dtype}; got "
                f"latents {got[0]} and text {got[1]} in {got[2]}"
            )

    @property
    def keys(self) -> int:
        return self.text_keys or self.text_tokens

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.frames, self.height, self.width)

    @property
    def text_shape(self) -> tuple[int, ...]:
        return (self.batch, self.text_tokens, self.text_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self) -> str:
        sizes = (*self.latent_shape, self.text_tokens, self.text_dim)
        return "x".join(map(str, sizes)) + f"k{self.keys}-{self.dtype}"


FORWARD_INPUTS = ("latents", "timestep", "text", "key_bias")  # `TransformerForward.forward`'s, in order


class TransformerForward(torch.nn.Module):
    """The transformer as a plain (latents, timestep, text, key bias) -> noise function, for export and
    compile. Call it inside `self.biased()`: its processors add the key bias to the text attention."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.state = TextBias()
        self.processors = [KeyBiasWanAttnProcessor(self.state) for _ in transformer.blocks]

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        self.state.key_bias = key_bias
        return self.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False
        )[0]

    @contextlib.contextmanager
    def biased(self):
        """The processors installed (the same objects every call: compiled code keeps its guards)."""
        try:
            with text_key_bias(self.transformer, self.processors):
                yield
        finally:
            self.state.key_bias = None  # hold no request's tensor between calls


class StepBackend:
    """What every step backend does: check the shape, drop the text padding (once per text), and run the
    forward (`_run`, each backend's own). The sampler calls it as `backend(latents, timestep, text_embeds)`;
    `cvg.runtime.backends.REGISTRY` names the backends and builds them."""

    backend = "torch"  # the registry's name of it

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        self.transformer, self.shape = transformer, shape
        self.forward = TransformerForward(transformer).eval()
        self._texts: list[tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]] = []

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        self.shape.check(latents, text_embeds)
        text, key_bias = self._collapsed(text_embeds)
        # A fresh [B] tensor of stride 1 (an expanded scalar keeps stride 0, which compiled code guards on).
        timestep = torch.empty(self.shape.batch, device=latents.device).copy_(timestep.expand(self.shape.batch))
        return self._run(latents, timestep, text, key_bias)

    def _collapsed(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows and key bias of `text_embeds`, found once per text: the sampler passes the same
        conditional and negative tensors every step, and finding the padding reads the text on the host
        (a sync per forward on a GPU otherwise). A text changed in place is found again."""
        for source, version, collapsed in self._texts:
            if source is text_embeds and version == text_embeds._version:
                return collapsed
        try:
            text, key_bias = collapse_padding(text_embeds, self.shape.keys)
        except ValueError as e:
            raise ValueError(
                f"this engine attends to {self.shape.keys} text rows: {e} (a longer prompt needs an "
                "engine built for it)"
            ) from None
        collapsed = (text.contiguous(), key_bias.contiguous())
        self._texts = [(text_embeds, text_embeds._version, collapsed), *self._texts[:1]]  # conditional and negative
        return collapsed

    def _run(self, latents, timestep, text, key_bias) -> torch.Tensor:
        with self.forward.biased():
            return self.forward(latents, timestep, text, key_bias)

    def _example(self) -> tuple[torch.Tensor, ...]:
        """Inputs of `_run`: latents, timestep, the kept text rows and their key bias."""
        device, dtype = self.transformer.device, self.shape.torch_dtype
        text = torch.randn(self.shape.text_shape, device=device, dtype=dtype)
        text[:, self.shape.keys // 2 :] = 0  # padded, so the bias is not all zero
        text, key_bias = collapse_padding(text, self.shape.keys)
        return (
            torch.randn(self.shape.latent_shape, device=device, dtype=dtype),
            torch.full((self.shape.batch,), 500.0, device=device),
            text,
            key_bias,
        )


class EagerBackend(StepBackend):
    """Eager torch: the reference every other backend is tested against."""


class CompiledBackend(StepBackend):
    """torch.compile with static shapes; compiled and warmed up here, not on the first request."""

    backend = "compiled"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        super().__init__(transformer, shape)
        cuda = transformer.device.type == "cuda"
        self.compiled = torch.compile(self.forward, dynamic=False, mode="reduce-overhead" if cuda else None)
        # On CPU the weights are frozen into the graph (oneDNN linears, prepacked); later weight changes go
        # unseen. torch 2.13's `torch.compile(options={"freezing": True})` leaves the parameters graph inputs
        # (measured): the config is patched around every call instead, the one that compiles included.
        self._config = contextlib.nullcontext() if cuda else torch._inductor.config.patch(freezing=True)
        with torch.no_grad():
            self._run(*self._example())

    def _run(self, latents, timestep, text, key_bias):
        with self.forward.biased(), self._config:
            return self.compiled(latents, timestep, text, key_bias).clone()  # CUDA-graph outputs are reused


def default_cache_dir() -> Path:
    return Path(os.environ.get("CVG_CACHE", Path.home() / ".cache" / "cvg")) / "engines"
