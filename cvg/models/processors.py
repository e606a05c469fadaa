"""Wan cross-attention processors that record pooled attention maps through `attention_pool`.

`record_maps(transformer, tokens, ...)` installs `PoolingWanAttnProcessor` on the cross-attention
(`attn2`) of the chosen blocks and yields a `MapRecorder`; on exit the original processors are back.
A forward pre-hook on the transformer reads the video-token grid (frames × height × width after
patchify) so that pooling tiles follow the video. Each recorded call keeps `[B, H, G, T]` maps, each
head apart, for its layer. With no tokens the processor returns exactly what
diffusers' `WanAttnProcessor` returns.

`text_key_bias(transformer, processors)` installs `KeyBiasWanAttnProcessor`s (sharing one `TextBias`)
on every `attn2`: text attention adds `key_bias` `[B, M]` to its scores, which makes attention over
collapsed padding exact (see `cvg.models.padding`). `record_maps(..., key_bias=...)` does the same for its
forward. `recording(transformer, recorder)` installs a recorder kept across forwards (guided graphs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTransformer3DModel,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from cvg.models.context_parallel import context_parallel_group, shard_pool_spec, sum_over_ranks
from cvg.models.patching import swapped
from cvg.ops.attention_pool import attention_pool_with_spec
from cvg.ops.pooling import PoolSpec, grid_groups, make_pool_spec

WAN_TEXT_LENGTH = 512  # Wan's processors hard-code the text context length for I2V splitting


@dataclass
class TextBias:
    """The additive `[B, M]` text-key bias of the current forward; None: none."""

    key_bias: torch.Tensor | None = None


class KeyBiasWanAttnProcessor(WanAttnProcessor):
    """`WanAttnProcessor` whose text attention adds `state.key_bias` to the scores of every query."""

    def __init__(self, state: TextBias):
        super().__init__()
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        bias = self.state.key_bias
        if bias is not None and encoder_hidden_states is not None:
            attention_mask = bias[:, None, None, :].to(hidden_states.dtype)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@contextmanager
def text_key_bias(transformer, processors: Sequence[KeyBiasWanAttnProcessor]) -> Iterator[None]:
    """Install `processors` (one per block, sharing a `TextBias`) on every `attn2` for the block."""
    _check_transformer(transformer)
    if transformer.config.image_dim is not None:
        raise ValueError("text key bias: image-conditioned Wan models split their context by length; unsupported")
    blocks = transformer.blocks
    if len(processors) != len(blocks):
        raise ValueError(f"text key bias: {len(processors)} processors for {len(blocks)} blocks")
    with swapped((block.attn2, "processor", processor) for block, processor in zip(blocks, processors, strict=True)):
        yield


@dataclass
class MapRecorder(TextBias):
    """What to record, and what was recorded in the current forward pass."""

    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [T] text key indices
    pool: tuple[int, int, int] = (1, 2, 2)
    backend: str = "auto"
    heads: int = 1
    grid: tuple[int, int, int] | None = None  # video-token grid of the current forward
    tiles: tuple[int, int, int] | None = None
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, G, T]
    group: object | None = None  # context parallelism: the ranks that share the video tokens (`recording` sets it)
    _spec: PoolSpec | None = None
    _keys_checked: int = 0

    @classmethod
    def for_transformer(
        cls,
        transformer,
        tokens: torch.Tensor | Sequence[int],
        pool: int | tuple[int, int, int] = (1, 2, 2),
        backend: str = "auto",
        key_bias: torch.Tensor | None = None,
    ) -> MapRecorder:
        _check_transformer(transformer)
        device = next(transformer.parameters()).device
        return cls(
            key_bias=key_bias,
            tokens=torch.as_tensor(tokens, dtype=torch.long, device=device),
            pool=(pool,) * 3 if isinstance(pool, int) else tuple(pool),
            backend=backend,
            heads=transformer.config.num_attention_heads,
        )

    def set_grid(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Start a forward over `grid`; the pooling is made when the grid changes, not every forward."""
        if grid != self.grid or self._spec is None or self._spec.groups.device != device:
            groups, self.tiles = grid_groups(*grid, self.pool)
            self.tokens = self.tokens.to(device)
            self._spec = make_pool_spec(groups.to(device), self.tokens, math.prod(self.tiles), self.heads, True)
            if self.group is not None:  # this rank's queries only; the ranks' maps add up (`stacked`)
                self._spec = shard_pool_spec(self._spec, self.group)
            self.grid = grid
        self.maps = {}

    def spec(self, keys: int, device: torch.device) -> PoolSpec:
        """The pooling of the current grid, for text of `keys` keys (token indices checked once per count;
        the pooling is on the device `set_grid` was given)."""
        if self._spec is None:
            raise RuntimeError("MapRecorder: no video grid yet; run the transformer inside record_maps()")
        if keys != self._keys_checked:
            if self.tokens.numel() and int(self.tokens.max()) >= keys:
                raise ValueError(f"recorded token {int(self.tokens.max())} is past the text's {keys} keys")
            self._keys_checked = keys
        return self._spec

    def stacked(self) -> torch.Tensor:
        """Recorded maps as `[B, layers, heads, tiles_f, tiles_h, tiles_w, T]`."""
        if not self.maps:
            raise RuntimeError("MapRecorder: nothing recorded; were the recorded layers reached?")
        maps = torch.stack([m for _, m in sorted(self.maps.items())], dim=1)
        if self.group is not None:
            maps = sum_over_ranks(maps, self.group)
        return maps.unflatten(3, self.tiles)


class PoolingWanAttnProcessor(KeyBiasWanAttnProcessor):
    """`WanAttnProcessor` whose text attention also pools the maps of the recorder's tokens."""

    def __init__(self, recorder: MapRecorder, layer: int):
        super().__init__(recorder)
        self.recorder, self.layer = recorder, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        recorder = self.recorder
        if recorder.tokens.numel() == 0 or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - WAN_TEXT_LENGTH
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(query, key_img, value_img, backend=self._attention_backend)
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        # Wan passes no text mask: the softmax spans the zero-padded text tokens (or their key bias).
        out, pooled = attention_pool_with_spec(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            recorder.spec(key.shape[1], key.device),
            query.shape[-1] ** -0.5,
            key_bias=recorder.key_bias,
            backend=recorder.backend,
        )
        # Keep the first map of each forward: gradient checkpointing re-runs this processor in backward, and
        # holding the re-run's map would keep the whole recomputed block alive.
        recorder.maps.setdefault(self.layer, pooled)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


def _check_transformer(transformer) -> None:
    if not isinstance(transformer, WanTransformer3DModel):
        raise TypeError(f"record_maps: expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}")


def transformer_blocks(transformer) -> torch.nn.ModuleList:
    """The denoising blocks of a Wan (`blocks`) or CogVideoX (`transformer_blocks`) transformer."""
    if isinstance(transformer, WanTransformer3DModel):
        return transformer.blocks
    if isinstance(transformer, CogVideoXTransformer3DModel):
        return transformer.transformer_blocks
    raise TypeError(
        f"expected a diffusers WanTransformer3DModel or CogVideoXTransformer3DModel, got {type(transformer).__name__}"
    )


def resolve_layers(transformer, layers: Sequence[int] | None) -> list[int]:
    """Block indices of a Wan or CogVideoX transformer to record (`block_indices`)."""
    return block_indices(len(transformer_blocks(transformer)), layers)


def block_indices(count: int, layers: Sequence[int] | None) -> list[int]:
    """Indices, sorted and unique, of `layers` among `count` blocks; None means every block. Negative
    indices count from the end."""
    chosen = list(range(count)) if layers is None else [i + count if i < 0 else i for i in layers]
    bad = [i for i in chosen if not 0 <= i < count]
    if bad or not chosen:
        raise ValueError(f"layers must index the transformer's {count} blocks, got {list(layers or [])}")
    return sorted(set(chosen))


@contextmanager
def record_maps(
    transformer,
    tokens: torch.Tensor | Sequence[int],
    layers: Sequence[int] | None = None,
    pool: int | tuple[int, int, int] = (1, 2, 2),
    backend: str = "auto",
    key_bias: torch.Tensor | None = None,
) -> Iterator[MapRecorder]:
    """Install recording processors on `attn2` of `layers` for the duration of the block. With
    `key_bias` (`[B, M]`, for text from `cvg.models.padding.collapse_padding`), every block's text attention
    adds it, recorded or not."""
    recorder = MapRecorder.for_transformer(transformer, tokens, pool, backend, key_bias)
    with recording(transformer, recorder, layers):
        yield recorder


@contextmanager
def recording(transformer, recorder: MapRecorder, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Install `recorder`'s processors (and a hook that reads the video grid) for the block. A recorder
    kept across calls keeps its pooling: entering this makes no tensor (CUDA-graph capture)."""
    _check_transformer(transformer)
    chosen = resolve_layers(transformer, layers)
    patch = transformer.config.patch_size
    recorder.group = context_parallel_group(transformer)

    def read_grid(module, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        _, _, frames, height, width = latents.shape
        recorder.set_grid((frames // patch[0], height // patch[1], width // patch[2]), latents.device)

    installed = {i: PoolingWanAttnProcessor(recorder, i) for i in chosen}
    if recorder.key_bias is not None:
        installed = {i: installed.get(i, KeyBiasWanAttnProcessor(recorder)) for i in range(len(transformer.blocks))}
    with (
        transformer.register_forward_pre_hook(read_grid, with_kwargs=True),
        swapped((transformer.blocks[i].attn2, "processor", processor) for i, processor in installed.items()),
    ):
        yield
