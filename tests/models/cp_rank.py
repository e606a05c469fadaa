"""One rank of tests/models/test_context_parallel.py (run as a script): a tiny Wan transformer split over
`--world` gloo ranks by diffusers' context parallelism (Ulysses), a guided step's objective, maps and latent
gradient, and a short guided generation; rank 0 saves them (without --world: the single-process run)."""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for guided.py
from guided import OBJECTIVES, PROMPTS  # noqa: E402

from cvg.guidance.config import GuidanceConfig  # noqa: E402
from cvg.models.context_parallel import enable_context_parallel  # noqa: E402
from cvg.models.tiny import tiny_wan_pipeline  # noqa: E402
from cvg.pipeline import CVGPipeline  # noqa: E402

SIZE = dict(height=64, width=64, num_frames=9, num_inference_steps=4, max_sequence_length=64)  # 3x4x4 tokens


def results() -> dict:
    pipe = tiny_wan_pipeline(seed=0, text_encoder_weights=False)
    if dist.is_initialized():
        enable_context_parallel(pipe.transformer, ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    config = GuidanceConfig(guide_steps=2, strength=0.3, pool=(1, 1, 1))
    out = {}
    for name, (kind, objective) in OBJECTIVES.items():
        prompt, composition = PROMPTS[kind]
        cvg = CVGPipeline(pipe, objective=objective, guidance=config)
        embeds, _ = cvg.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=64)
        latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        denoiser = cvg.steps.denoisers(embeds, None, latents, 1.0)["transformer"]
        bound = cvg.bind(prompt, composition, 64)
        inputs = denoiser.prepare(bound, config)
        loss, maps, grad = denoiser.score(latents, torch.tensor(900.0), objective, bound, config, True, inputs)
        queries = inputs.recorder._spec.groups.numel()  # the video tokens this rank's cross-attention pooled
        out[name] = {"loss": loss, "maps": maps, "grad": grad, "queries": queries}
    generated = CVGPipeline(pipe, guidance=config)(
        *PROMPTS["spatial"], generator=torch.Generator().manual_seed(2), output_type="latent", **SIZE
    )
    out["generation"] = {"latents": generated.frames, "objective": torch.stack(generated.objective_values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    found = results()
    if args.rank == 0:
        torch.save(found, args.out)
    if args.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
