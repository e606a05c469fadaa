"""One guided and one unguided denoising step of the Wan2.1-T2V-1.3B transformer at its real width (its
published configuration, `configs/wan2.1-t2v-1.3b-transformer.json`: 30 blocks, 12 heads x 128, FFN 8960,
text dim 4096; random weights) at token counts this CPU holds, against guidance that reads materialised
attention maps, with a memory model fitted to nothing: what the maths says each path holds, set beside the
measured peaks and extrapolated to 832x480x81 (32,760 video tokens).

Each measurement runs in its own process (`cvg.measure`): the model is built, called once to
warm up, then one call is timed and its peak resident memory above the warmed-up process recorded. The
text is 512 rows of 4096 (Wan's padded length), zero past the prompt's tokens; cvg collapses that padding
(exact), the materialised baseline attends over all 512 rows as Attend-and-Excite does.

    python benchmarks/real_width.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cvg.measure import ISOLATED_ENV, clip_size, json_child, machine_line, publish, warm_peak

CONFIG = Path(__file__).with_name("configs") / "wan2.1-t2v-1.3b-transformer.json"
PROMPT, COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"
TEXT_ROWS = 512
VARIANTS = ("unguided step", "guided step", "guided step, materialised maps")
FULL = (81, 480, 832)  # frames, height, width of Wan2.1's own clips
MiB = 1 << 20


def video_tokens(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The latent token grid (f, h, w) of a clip: Wan's VAE (4x time, 8x space) then 1x2x2 patches."""
    return (frames - 1) // 4 + 1, height // 16, width // 16


def build_transformer(dtype: torch.dtype, device: str = "cpu", layers: int | None = None):
    """The real-width transformer with random weights (`layers` fewer blocks for a smoke run)."""
    from diffusers import WanTransformer3DModel

    from cvg.models.wan import cast_transformer

    config = json.loads(CONFIG.read_text()) | ({"num_layers": layers} if layers else {})
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel.from_config(config).eval()
    return cast_transformer(model, dtype) if dtype != torch.float32 else model


def step_call(variant: str, model, frames: int, height: int, width: int):
    """One call of `variant` on `model` at this clip size: the unguided step under no_grad as the pipeline
    runs it, or a guided step's objective and latent gradient."""
    from cvg.guidance.composition import Composition
    from cvg.guidance.config import GuidanceConfig
    from cvg.guidance.objectives import objective_for
    from cvg.guidance.sampler import Denoiser
    from cvg.models.minilm import minilm_tokenizer

    tokenizer = minilm_tokenizer()
    bound = Composition.parse(COMPOSITION).bind(tokenizer, [PROMPT], TEXT_ROWS)
    gen = torch.Generator().manual_seed(1)
    f, h, w = video_tokens(frames, height, width)
    latents = torch.randn(1, model.config.in_channels, f, 2 * h, 2 * w, generator=gen).to(model.device)
    prompt_rows = len(tokenizer(PROMPT).input_ids)
    text = torch.zeros(2, TEXT_ROWS, model.config.text_dim)
    text[:, :prompt_rows] = torch.randn(2, prompt_rows, model.config.text_dim, generator=gen)
    text = text.to(model.device, model.dtype)
    denoiser = Denoiser(model, text[:1], text[1:], guidance_scale=5.0)
    t = torch.tensor([900.0], device=model.device)
    materialised = variant.endswith("materialised maps")
    config = GuidanceConfig(backend="naive" if materialised else "auto", collapse_padding=not materialised)
    objective = objective_for("spatial")

    def call():
        if variant == "unguided step":
            with torch.no_grad():
                return denoiser.predict(latents, t, 0, 0.9, 20)
        return denoiser.score(latents, t, objective, bound, config, gradient=True)[2]

    return call


def modelled_bytes(variant: str, config: dict, grid: tuple[int, int, int], dtype_bytes: int) -> dict[str, int]:
    """What each path must hold at its peak, by its maths (batch 1, every block recorded):
    - a block's saved activations for the latent's gradient: `activations.saved_activation_bytes`'s upper
      estimate (float32 figures); the materialised baseline adds the block's cross-attention
      probabilities [H, N, 512] (float32 from the softmax, and a copy in a half type), the score tensor
      they come from, and the keys and values of all 512 text rows;
    - past cvg's 1 GiB rule the guided step checkpoints: each block's input kept, one block recomputed at
      a time; below it every block's activations are kept;
    - the unguided step (no gradient): two activations of the widest layer at a time."""
    from types import SimpleNamespace

    from cvg.guidance.activations import ACTIVATION_BUDGET_BYTES, saved_activation_bytes

    heads, width = config["num_attention_heads"], config["num_attention_heads"] * config["attention_head_dim"]
    blocks, tokens = config["num_layers"], math.prod(grid)
    if variant == "unguided step":
        return {"activations": 2 * tokens * (width + config["ffn_dim"]) * dtype_bytes}
    model = SimpleNamespace(config=SimpleNamespace(**config))
    latents = torch.empty(1, config["in_channels"], grid[0], 2 * grid[1], 2 * grid[2], device="meta")
    block = saved_activation_bytes(model, latents, 1)
    maps, scores = 0, 0  # per block saved; the one score tensor alive at a time
    if variant.endswith("materialised maps"):
        probs = heads * tokens * TEXT_ROWS
        maps = probs * (4 + (dtype_bytes if dtype_bytes < 4 else 0)) + 2 * TEXT_ROWS * width * dtype_bytes
        scores = probs * 4
    if blocks * block > ACTIVATION_BUDGET_BYTES:  # checkpointed
        parts = {"block inputs": blocks * tokens * width * dtype_bytes, "one block recomputed": block}
        return parts | ({"one block's maps and text keys/values": maps + scores} if maps else {})
    parts = {"every block's activations": blocks * block}
    return parts | ({"every block's maps and text keys/values": blocks * maps + scores} if maps else {})


def _child(variant: str, size: tuple[int, int, int], dtype: str) -> dict:
    frames, height, width = size
    argv = ["benchmarks/real_width.py", "--child", variant, "--size", f"{height}x{width}x{frames}", "--dtype", dtype]
    return json_child(argv, ISOLATED_ENV, f"{variant} at {height}x{width}x{frames}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        default="240x416x1,240x416x5",
        help="HEIGHTxWIDTHxFRAMES clips to measure, comma-separated (default 240x416x1,240x416x5)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=clip_size, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        call = step_call(args.child, build_transformer(getattr(torch, args.dtype)), *args.size)
        print(json.dumps(warm_peak(call, args.child)))
        return
    config = json.loads(CONFIG.read_text())
    dtype_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    rows = []
    for size in (clip_size(s) for s in args.sizes.split(",")):
        grid = video_tokens(*size)
        tokens = math.prod(grid)
        for variant in VARIANTS:
            measured = _child(variant, size, args.dtype)
            model = sum(modelled_bytes(variant, config, grid, dtype_bytes).values())
            rows.append((size, tokens, variant, measured, model))
            print(f"{size} {variant}: {measured}, model {model / MiB:.0f} MiB", flush=True)
    full = video_tokens(*FULL)
    lines = [
        f"Wan2.1-T2V-1.3B transformer at real width (random weights), {machine_line()}, {args.dtype}, batch 1, "
        "every block recorded, one call each after a warm-up, in a fresh process; peak = resident memory above "
        "the warmed-up process.",
        "",
        "| clip (HxWxF) | video tokens | step | time (s) | peak MiB, measured | peak MiB, model | measured / model "
        "| one [1, 12, N, 512] float32 tensor (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (frames, height, width), tokens, variant, measured, model in rows:
        lines.append(
            f"| {height}x{width}x{frames} | {tokens} | {variant} | {measured['seconds']:.1f} "
            f"| {measured['peak_bytes'] / MiB:.0f} | {model / MiB:.0f} | {measured['peak_bytes'] / model:.2f} "
            f"| {12 * tokens * TEXT_ROWS * 4 / MiB:.1f} |"
        )
    lines += [
        "",
        f"The model at 832x480x81 ({math.prod(full)} video tokens), {args.dtype}; for scale, one [1, 12, N, 512] "
        f"float32 map tensor there is {12 * math.prod(full) * TEXT_ROWS * 4 / (1 << 30):.1f} GiB:",
        "",
        "| step | what it holds | GiB |",
        "|---|---|---|",
    ]
    for variant in VARIANTS:
        for part, size in modelled_bytes(variant, config, full, dtype_bytes).items():
            lines.append(f"| {variant} | {part} | {size / (1 << 30):.1f} |")
    publish("Command: `python benchmarks/real_width.py`\n\n" + "\n".join(lines), args.write, "real_width")


if __name__ == "__main__":
    main()
