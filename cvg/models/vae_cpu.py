"""Decoding with diffusers' `AutoencoderKLWan` on CPU, around two slow CPU paths; same maths.

- `WanRMS_norm` calls `F.normalize` over the channel dim of `[B, C, T, H, W]` tensors: CPU
  `linalg_vector_norm` over that strided dim took half of a small VAE's decode. A sum of squares over
  dim 1 is the same norm and vectorises.
- With few channels CPU `conv3d` falls back to `slow_conv3d`, whose im2col buffer is `C·k³` times the
  output (84 MiB for one 4-frame chunk of a 3-channel layer at 256x256). Wan's causal convolutions pad
  their input themselves and have stride 1, so each is one 2D convolution (oneDNN, no im2col) with the
  frames in the batch and each output frame's temporal taps side by side in the channels: one call with
  `taps·C` input channels instead of a sum of `taps` calls (the shipped VAE's decode: 0.26 -> 0.23 s). Its
  input holds each frame `taps` times: the decode's peak memory did not move on cvg.bench's VAE.
Results equal diffusers' own decode up to float rounding (tests/test_pipeline.py checks it).
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from cvg.models.patching import Swap, swapped


def _conv3d_taps_in_channels(self: WanCausalConv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    batch, channels, frames, height, width = x.shape
    out_channels, _, taps, *kernel = weight.shape
    out_frames = frames - taps + 1
    # [B, C, F', H, W, taps] -> [B·F', taps·C, H, W]: each output frame's input frames side by side in channels
    window = x.unfold(2, taps, 1).permute(0, 2, 5, 1, 3, 4).reshape(batch * out_frames, taps * channels, height, width)
    y = F.conv2d(window, weight.transpose(1, 2).reshape(out_channels, taps * channels, *kernel), bias)
    return y.unflatten(0, (batch, out_frames)).transpose(1, 2)


def _rms_norm(self: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # as diffusers: half types in float32
    norm = wide.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)  # F.normalize's eps
    return (wide / norm).to(x.dtype) * self.scale * self.gamma + self.bias


def _plain(conv: WanCausalConv3d) -> bool:
    return conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding == (0, 0, 0)


def cpu_decoding(vae: torch.nn.Module):
    """For the duration, `vae`'s causal convolutions and channel RMS norms take the fast CPU paths (a
    no-op for a VAE on another device)."""
    swaps: list[Swap] = []
    if next(vae.parameters()).device.type == "cpu":
        for module in vae.modules():
            if isinstance(module, WanCausalConv3d) and _plain(module):
                swaps.append((module, "_conv_forward", MethodType(_conv3d_taps_in_channels, module)))
            elif isinstance(module, WanRMS_norm) and module.channel_first:
                swaps.append((module, "forward", MethodType(_rms_norm, module)))
    return swapped(swaps)
