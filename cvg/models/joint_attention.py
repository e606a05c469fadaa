"""CogVideoX's joint attention, recorded through `attention_pool`.

CogVideoX concatenates its text tokens before its video tokens and runs one attention over both (the
`attn1` of each `CogVideoXBlock`; there is no cross-attention). The pooled map of a text token is then the
video-query x text-key block of that joint softmax: `PoolingCogVideoXAttnProcessor` runs the whole joint
attention through `attention_pool` with the text queries pooled into one extra tile that is dropped, so
neither the `[B, H, M+N, M+N]` probabilities nor their video x text block is ever built.

The maps are not renormalised over the text keys: a video query's probabilities over the M text keys sum
to its share of attention on text, not to 1. Renormalising would divide by that share, which is small
where a region attends mostly to video, and so amplify exactly the regions that take least from the prompt;
left as they are, a map says both where a word is attended to and how much, which is what the presence
and spatial objectives read. (Wan's cross-attention spans text keys only, so its maps sum to 1 over them.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from cvg.models.patching import swapped
from cvg.models.processors import block_indices
from cvg.ops.attention_pool import attention_pool_with_spec
from cvg.ops.pooling import PoolSpec, grid_groups, make_pool_spec


@dataclass
class JointMapRecorder:
    """What to record from joint attention, and what the current forward recorded: layer -> `[B, H, G, T]`."""

    tokens: torch.Tensor  # [T] text token indices (text keys come first in the joint sequence)
    pool: tuple[int, int, int]
    heads: int
    backend: str = "auto"
    grid: tuple[int, int, int] | None = None  # video-token grid of the current forward
    tiles: tuple[int, int, int] | None = None
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    _specs: dict[tuple, PoolSpec] = field(default_factory=dict)

    @classmethod
    def for_transformer(
        cls,
        transformer,
        tokens: torch.Tensor | Sequence[int],
        pool: int | tuple[int, int, int] = (1, 2, 2),
        backend: str = "auto",
    ) -> JointMapRecorder:
        _check_transformer(transformer)
        return cls(
            tokens=torch.as_tensor(tokens, dtype=torch.long),
            pool=(pool,) * 3 if isinstance(pool, int) else tuple(pool),
            heads=transformer.config.num_attention_heads,
            backend=backend,
        )

    def set_grid(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Start a forward over `grid` (the pooling is made per text length and device, in `spec`)."""
        self.grid, self.maps = grid, {}

    def spec(self, keys: int, device: torch.device) -> PoolSpec:
        """The pooling of the joint sequence: text queries in one extra tile (the last), video queries in
        the tiles of the grid; made once per (grid, text length, device)."""
        key = (self.grid, keys, device)
        if key not in self._specs:
            if self.tokens.numel() and int(self.tokens.max()) >= keys:
                raise ValueError(f"recorded token {int(self.tokens.max())} is past the text's {keys} tokens")
            groups, self.tiles = grid_groups(*self.grid, self.pool)
            dropped = math.prod(self.tiles)
            joint = torch.cat([torch.full((keys,), dropped, dtype=groups.dtype), groups]).to(device)
            self._specs[key] = make_pool_spec(joint, self.tokens.to(device), dropped + 1, self.heads, True)
        return self._specs[key]

    def stacked(self) -> torch.Tensor:
        """Recorded maps as `[B, layers, heads, tiles_f, tiles_h, tiles_w, T]`."""
        if not self.maps:
            raise RuntimeError("JointMapRecorder: nothing recorded; were the recorded layers reached?")
        return torch.stack([m for _, m in sorted(self.maps.items())], dim=1).unflatten(3, self.tiles)


class PoolingCogVideoXAttnProcessor:
    """diffusers' `CogVideoXAttnProcessor2_0` (same arithmetic) whose joint attention also pools the maps of
    the recorder's text tokens over the video queries."""

    def __init__(self, recorder: JointMapRecorder, layer: int):
        self.recorder, self.layer = recorder, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("PoolingCogVideoXAttnProcessor: CogVideoX's joint attention takes no mask")
        text_tokens = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        projections = (attn.to_q, attn.to_k, attn.to_v)
        query, key, value = (proj(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2) for proj in projections)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # on the video tokens only, as diffusers does (out of place here)
            query = torch.cat(
                [query[:, :, :text_tokens], apply_rotary_emb(query[:, :, text_tokens:], image_rotary_emb)], 2
            )
            if not attn.is_cross_attention:
                key = torch.cat(
                    [key[:, :, :text_tokens], apply_rotary_emb(key[:, :, text_tokens:], image_rotary_emb)], 2
                )
        recorder = self.recorder
        spec = recorder.spec(text_tokens, query.device)
        out, pooled = attention_pool_with_spec(
            query, key, value, spec, query.shape[-1] ** -0.5, backend=recorder.backend
        )
        recorder.maps.setdefault(self.layer, pooled[:, :, :-1])  # the text queries' tile is dropped
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2, 3)))
        encoder_hidden_states, hidden_states = out.split([text_tokens, out.size(1) - text_tokens], dim=1)
        return hidden_states, encoder_hidden_states


def _check_transformer(transformer) -> None:
    if not isinstance(transformer, CogVideoXTransformer3DModel):
        raise TypeError(f"record_joint_maps: expected a CogVideoXTransformer3DModel, got {type(transformer).__name__}")


@contextmanager
def record_joint_maps(
    transformer,
    tokens: torch.Tensor | Sequence[int],
    layers: Sequence[int] | None = None,
    pool: int | tuple[int, int, int] = (1, 2, 2),
    backend: str = "auto",
) -> Iterator[JointMapRecorder]:
    """Install recording processors on `attn1` of `layers` (None: every block) of a CogVideoX transformer
    for the block and yield their recorder."""
    recorder = JointMapRecorder.for_transformer(transformer, tokens, pool, backend)
    with joint_recording(transformer, recorder, layers):
        yield recorder


@contextmanager
def joint_recording(transformer, recorder: JointMapRecorder, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Install `recorder`'s processors on `attn1` of `layers` for the block; a pre-hook reads the video grid
    from the transformer's latents `[B, F, C, H, W]`. A recorder kept across calls keeps its pooling."""
    _check_transformer(transformer)
    config, blocks = transformer.config, transformer.transformer_blocks
    frames_per_token, side = config.patch_size_t or 1, config.patch_size

    def read_grid(module, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        _, frames, _, height, width = latents.shape
        recorder.set_grid((frames // frames_per_token, height // side, width // side), latents.device)

    chosen = block_indices(len(blocks), layers)
    processors = [(blocks[i].attn1, "processor", PoolingCogVideoXAttnProcessor(recorder, i)) for i in chosen]
    with transformer.register_forward_pre_hook(read_grid, with_kwargs=True), swapped(processors):
        yield
