"""Exact collapse of Wan's zero-padded text: cross-attention over a few keys instead of 512.

WanPipeline pads every prompt's embeddings with zero rows to `max_sequence_length` (512) and passes
no mask, so each video token attends to all the padding. Wan's text keys carry no position and every
op on the text before the attention is row-wise, so all zero rows give one and the same key and value:
n identical keys weigh exactly as one of them with `log n` added to its score. `collapse_padding`
keeps the first `length` rows and returns that additive key bias, spreading the padding's count over
the zero rows kept; attention with the bias equals attention over the whole padded text.
"""

from __future__ import annotations

import math

import torch

LENGTH_STEP = 64  # engine text lengths are multiples of this, so most prompts of a model share one engine


def text_rows(embeds: torch.Tensor) -> int:
    """Rows up to the last non-zero one of any batch item (reads the text on the host)."""
    nonzero = embeds.ne(0).any(dim=-1).any(dim=0)  # [L]
    return int(nonzero.nonzero().max()) + 1 if nonzero.any() else 0


def needed_length(embeds: torch.Tensor, total: int | None = None) -> int:
    """Rows to keep: the text's rows plus one zero row to carry the padding (none when the text has no
    padding: `total`, default its length, reached)."""
    return min(text_rows(embeds) + 1, embeds.shape[1] if total is None else total)


def padded_length(embeds: torch.Tensor) -> int:
    """`needed_length` rounded up to a multiple of LENGTH_STEP (at most the text length): a static length."""
    return min(math.ceil(needed_length(embeds) / LENGTH_STEP) * LENGTH_STEP, embeds.shape[1])


def collapse_padding(
    embeds: torch.Tensor, length: int | None = None, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L, D]` text embeddings -> (the first `length` rows, `[B, length]` key bias). Default length:
    `needed_length`. `total` (default L) is the padded length the text stands for: text already cut
    to L rows then attends as if padded to `total`. A length that would cut off a non-zero row, or keep
    no zero row for padding that exists, is an error."""
    total = embeds.shape[1] if total is None else total
    needed = needed_length(embeds, total)
    length = needed if length is None else length
    if length > embeds.shape[1]:
        raise ValueError(f"cannot keep {length} rows of a {embeds.shape[1]}-row text")
    if length < needed:
        raise ValueError(
            f"the text has {text_rows(embeds)} rows before its zero padding; with room for its padding "
            f"they do not fit in {length} keys"
        )
    zero = embeds[:, :length].eq(0).all(dim=-1)  # [B, length]
    kept = zero.sum(dim=1, keepdim=True)
    dropped = total - length  # all zero rows, by the check above
    ratio = (kept + dropped).float() / kept.clamp_min(1).float()
    bias = torch.where(zero, ratio.log(), 0.0).to(embeds.dtype)
    return embeds[:, :length], bias
