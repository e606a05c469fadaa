"""Guidance under diffusers' context parallelism: one video's tokens split over several processes.

diffusers splits a Wan transformer's video tokens over the ranks before its first block (`_cp_plan`) and
runs self-attention with Ulysses or ring collectives; the text is not split, so each rank's cross-attention
reads its own video queries against all text keys. Pooled maps are then partial on every rank: each pools
its own queries (`shard_pool_spec`, with the weights of whole tiles), and `sum_over_ranks` adds them, so
every rank holds the maps of the whole video and scores the same objective. A latent's gradient reaches
each rank only through its own tokens: summed over the ranks (`reduce_gradient`) it is the single-process
gradient.

    torch.distributed.init_process_group("gloo")          # or nccl, one process per device
    enable_context_parallel(pipe.transformer, ContextParallelConfig(ulysses_degree=world_size))
    out = CVGPipeline(pipe)(prompt, composition, generator=torch.Generator().manual_seed(seed))  # same on every rank
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from cvg.models.patching import swapped
from cvg.ops.pooling import PoolSpec


def enable_context_parallel(transformer, config) -> None:
    """`transformer.enable_parallelism(config=config)`, also on CPU: diffusers 0.42 picks a device by
    `rank % torch.accelerator.device_count()`, which divides by zero where there is no accelerator."""
    if torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=config)
        return
    with swapped([(torch.accelerator, "device_count", lambda: 1)]):
        transformer.enable_parallelism(config=config)


def context_parallel_group(transformer) -> dist.ProcessGroup | None:
    """The process group over which the transformer splits its video tokens (context parallelism), else
    None. This process's share is the `dist.get_rank(group)`-th of `dist.get_world_size(group)` equal
    chunks, as diffusers splits them."""
    config = getattr(transformer, "_parallel_config", None)
    context = getattr(config, "context_parallel_config", None)
    mesh = getattr(context, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()


def shard_pool_spec(spec: PoolSpec, group: dist.ProcessGroup) -> PoolSpec:
    """The pooling of this rank's chunk of the queries, each with its weight in its whole tile: summed over
    the group's ranks, the pooled maps are those of the whole video."""
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    if spec.groups.numel() % ranks:
        raise ValueError(f"{spec.groups.numel()} video tokens do not split evenly over {ranks} ranks")
    return replace(spec, groups=spec.groups.chunk(ranks)[rank], query_weight=spec.query_weight.chunk(ranks)[rank])


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; backward passes the gradient through as it is: every rank computes the
    same loss from the summed maps, so d loss / d (its partial maps) is d loss / d (summed maps)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_over_ranks(partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _SumOverRanks.apply(partial, group)


def reduce_gradient(transformer, grad: torch.Tensor) -> torch.Tensor:
    """A latent's gradient summed over the context-parallel ranks (as it is without context parallelism)."""
    group = context_parallel_group(transformer)
    if group is not None:
        dist.all_reduce(grad, group=group)
    return grad
