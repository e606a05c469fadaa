"""One block of the CogVideoX-2B transformer at its real width (its published configuration,
`configs/cogvideox-2b-transformer.json`: 30 heads x 64, text dim 4096, 226 text tokens; random weights,
`num_layers` 1) at token counts this CPU holds: an unguided forward, and a guided one (forward with the
joint-attention maps recorded, then the latent's gradient), the maps read by `attention_pool` or, as the
baseline, from the materialised joint probabilities (`backend="naive"`: `[B, H, M+N, M+N]`). Each in its
own process (`cvg.measure`): built, warmed up, one call timed, its peak resident memory above
the warmed-up process recorded.

    python benchmarks/joint_attention_width.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cvg.measure import ISOLATED_ENV, clip_size, json_child, machine_line, publish, warm_peak

CONFIG = Path(__file__).with_name("configs") / "cogvideox-2b-transformer.json"
VARIANTS = ("unguided block", "guided block", "guided block, materialised maps")
TOKENS = [3, 4, 9, 10]  # text tokens whose maps are read (two words of two pieces each, say)
FULL = (49, 480, 720)  # frames, height, width of CogVideoX-2B's own clips
MiB = 1 << 20


def video_tokens(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The latent token grid of a clip: CogVideoX's VAE (4x time, 8x space) then 2x2 patches."""
    return (frames - 1) // 4 + 1, height // 16, width // 16


def block_call(variant: str, frames: int, height: int, width: int):
    """One call of `variant` on a one-block CogVideoX-2B-width transformer at this clip size."""
    from diffusers import CogVideoXTransformer3DModel

    from cvg.models.joint_attention import record_joint_maps

    config = json.loads(CONFIG.read_text()) | {"num_layers": 1}
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel.from_config(config).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    f, h, w = video_tokens(frames, height, width)
    latents = torch.randn(1, f, config["in_channels"], 2 * h, 2 * w, generator=gen)
    text = torch.randn(1, config["max_text_seq_length"], config["text_embed_dim"], generator=gen)
    timestep = torch.tensor([900])

    def forward(x):
        return model(hidden_states=x, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]

    def call():
        if variant == "unguided block":
            with torch.no_grad():
                return forward(latents)
        x = latents.clone().requires_grad_(True)
        backend = "naive" if variant.endswith("materialised maps") else "auto"
        with record_joint_maps(model, TOKENS, pool=(1, 2, 2), backend=backend) as recorder:
            forward(x)
            maps = recorder.stacked()
        return torch.autograd.grad(maps.square().sum(), x)[0]

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        default="480x720x1,480x720x5",
        help="HEIGHTxWIDTHxFRAMES clips, comma-separated (default %(default)s)",
    )
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=clip_size, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(warm_peak(block_call(args.child, *args.size), args.child)))
        return
    config = json.loads(CONFIG.read_text())
    heads, text = config["num_attention_heads"], config["max_text_seq_length"]
    lines = [
        f"One CogVideoX-2B-width block (random weights), {machine_line()}, float32, batch 1, one call each after "
        "a warm-up, in a fresh process; peak = resident memory above the warmed-up process; "
        f"{len(TOKENS)} text tokens' maps, pooled 1x2x2.",
        "",
        "| clip (HxWxF) | video tokens | variant | time (s) | peak MiB | / materialised | one [1, 30, M+N, M+N] "
        "float32 tensor (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for frames, height, width in (clip_size(s) for s in args.sizes.split(",")):
        tokens = math.prod(video_tokens(frames, height, width))
        argv = ["benchmarks/joint_attention_width.py", "--size", f"{height}x{width}x{frames}", "--child"]
        measured = {v: json_child([*argv, v], ISOLATED_ENV, f"{v} at {height}x{width}x{frames}") for v in VARIANTS}
        baseline = measured[VARIANTS[2]]["peak_bytes"]
        for variant, m in measured.items():
            print(f"{height}x{width}x{frames} {variant}: {m}", flush=True)
            lines.append(
                f"| {height}x{width}x{frames} | {tokens} | {variant} | {m['seconds']:.2f} "
                f"| {m['peak_bytes'] / MiB:.0f} | {m['peak_bytes'] / baseline:.2f} "
                f"| {heads * (tokens + text) ** 2 * 4 / MiB:.0f} |"
            )
    full = math.prod(video_tokens(*FULL))
    lines += [
        "",
        f"At 720x480x49 ({full} video tokens + {text} text) one block's joint probabilities in float32 are "
        f"{heads * (full + text) ** 2 * 4 / (1 << 30):.1f} GiB, which the materialised baseline holds (with their "
        "gradient) and `attention_pool` never builds.",
    ]
    publish(
        "Command: `python benchmarks/joint_attention_width.py`\n\n" + "\n".join(lines),
        args.write,
        "joint_attention_width",
    )


if __name__ == "__main__":
    main()
