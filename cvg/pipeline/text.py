"""The prompts' text encoding, with the most recently encoded ones kept (a served negative prompt, a prompt
asked again)."""

from __future__ import annotations

import torch

from cvg.models.families import Adapter
from cvg.models.patching import swapped

MAX_TEXTS = 16  # encoded prompts kept per pipeline (the negative prompt, a served prompt asked again)


class PromptEncoder:
    def __init__(self, pipe, adapter: Adapter):
        self.pipe, self.adapter = pipe, adapter
        self._texts: dict[tuple, torch.Tensor] = {}  # encoded prompts, most recent last

    def __call__(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`WanPipeline.encode_prompt` (same arguments and checks) with the text encoder run over the prompts'
        own tokens (`trimmed_prompt_embeds`: equal to float rounding), and the `MAX_TEXTS` most recently
        encoded prompts kept. A kept encoding is reused only for the same encoder with unchanged weights.
        CogVideoX's encoder runs over the padding as CogVideoXPipeline runs it (`adapter.text_embeds`)."""
        with swapped([(self.pipe, "_get_t5_prompt_embeds", self._encoded)]):
            return self.pipe.encode_prompt(**kwargs)

    def _encoded(self, prompt, num_videos_per_prompt=1, max_sequence_length=226, device=None, dtype=None):
        videos, length = num_videos_per_prompt, max_sequence_length
        encoder = self.pipe.text_encoder
        weights = tuple(p._version for p in encoder.parameters())  # in-place changes count up
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        key = (encoder, weights, tuple(prompts), videos, length, str(device), dtype)
        embeds = self._texts.pop(key, None)
        if embeds is None:
            embeds = self.adapter.text_embeds(self.pipe, prompts, videos, length, device, dtype)
        self._texts[key] = embeds
        while len(self._texts) > MAX_TEXTS:
            self._texts.pop(next(iter(self._texts)))
        return embeds.clone()  # the caller's to change
