"""The CompShapes generator: a small Wan VAE and Wan transformer trained here, on CPU, from CompShapes renders.

    cvg train-generator --out models/compshapes-wan --seed 0

Three stages, each checkpointed under OUT/.work so an interrupted run resumes where it stopped and ends
where an uninterrupted one would (every step draws its data from (seed, stage, step)):
  1. VAE: `AutoencoderKLWan` with 4x spatial and 4x temporal compression, on whole clips;
  2. latents: training clips encoded once (posterior mean and std), prompts encoded by MiniLM;
  3. transformer: `WanTransformer3DModel`, flow matching (rectified flow, shifted sigmas as Wan's scheduler
     uses them), text dropped 10% of the time for classifier-free guidance, EMA weights kept.
Only prompts of the sealed train split (`grammar.split_of`) are trained on, true and counterfactual alike.
The result is a standard diffusers `WanPipeline` directory without the text encoder: its 90 MB are not
copied, `generator.json` names the package that holds it and `cvg.models.wan.load_wan_pipeline` puts it back
(`WanPipeline.from_pretrained(path, text_encoder=..., tokenizer=...)` does the same by hand).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from cvg.io.files import file_digest, locked, write_text_atomic
from cvg.models.minilm import PACKAGE, load_minilm
from cvg.models.padding import collapse_padding
from cvg.models.processors import KeyBiasWanAttnProcessor, TextBias, text_key_bias
from cvg.models.wan import MANIFEST, model_key, to_pixels
from cvg_research.compshapes.world import BACKGROUND, render
from cvg_research.training.loop import Checkpoint, LossLog, cached_chunks, cosine_schedule, plot_losses
from cvg_research.training.recipe import GeneratorRecipe, check_resumable, seeded, training_clips
from cvg_research.training.vae import near_objects, train_vae

LOCK = ".lock"  # in OUT/.work: held by the one trainer of OUT


def build_transformer(recipe: GeneratorRecipe) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=recipe.heads,
        attention_head_dim=recipe.head_dim,
        in_channels=recipe.z_dim,
        out_channels=recipe.z_dim,
        text_dim=384,
        freq_dim=256,
        ffn_dim=recipe.ffn_dim,
        num_layers=recipe.layers,
        rope_max_seq_len=64,
    )


@torch.no_grad()
def encode_latents(
    recipe: GeneratorRecipe, vae: AutoencoderKLWan, text: WanPipeline, work: Path, report=print, chunk: int = 100
) -> dict:
    """Posterior mean/std of every training clip and MiniLM embeddings of their prompts, in resumable chunks."""

    def encode(clips: list) -> dict:
        frames = [render(c.scene) for c in clips]
        posterior = vae.encode(to_pixels(frames)).latent_dist
        objects = latent_object_mask(frames, margin=recipe.object_margin)
        return {"mean": posterior.mean, "std": posterior.std, "objects": objects}

    clips = training_clips(recipe, 2, 0, recipe.clips)  # scene specs only: each chunk renders its own
    parts = cached_chunks(clips, work / "latents", chunk, chunk_description(vae), encode, report)
    prompts = [p for part in parts for p in part["prompts"]]
    unique = ["", *sorted(set(prompts))]  # "" is the unconditional (negative) prompt
    position = {p: i for i, p in enumerate(unique)}
    embeds = [
        text.encode_prompt(unique[i : i + 64], do_classifier_free_guidance=False, max_sequence_length=32)[0]
        for i in range(0, len(unique), 64)
    ]
    # MiniLM with an attention mask gives the real tokens the same states at any padded length; Wan pads with zeros.
    embeds = torch.cat(embeds)
    return {
        "mean": torch.cat([p["mean"] for p in parts]),
        "std": torch.cat([p["std"] for p in parts]),
        "objects": torch.cat([p["objects"] for p in parts]),
        "prompt": torch.tensor([position[p] for p in prompts]),
        "embeds": embeds,
    }


def latent_object_mask(frames: list[np.ndarray], spatial: int = 4, temporal: int = 4, margin: int = 0) -> torch.Tensor:
    """Which latent cells hold an object pixel or one within `margin` pixels of an object: bool
    [B, 1, F', H/spatial, W/spatial], cells laid out as the causal VAE's (frame 0 alone, then `temporal`
    frames per latent frame)."""
    background = np.asarray(BACKGROUND, np.int16)
    drawn = torch.from_numpy(np.stack([(np.abs(f.astype(np.int16) - background).max(-1) > 12) for f in frames]))
    drawn = near_objects(drawn, margin)
    first, rest = drawn[:, :1], drawn[:, 1:]
    rest = rest.unflatten(1, (rest.shape[1] // temporal, temporal)).any(2)
    cells = torch.cat([first, rest], 1).float()  # [B, F', H, W]
    return (F.max_pool2d(cells, spatial) > 0).unsqueeze(1)


def chunk_description(vae: AutoencoderKLWan) -> Callable[[list], dict]:
    """What a latent chunk records: its clips' prompts and the VAE that encoded them (a hash of its weights).
    A chunk of other clips, or of another VAE (a refined one, say), is encoded again, not reused."""
    key = model_key(vae)
    return lambda clips: {"prompts": [c.prompt for c in clips], "vae": key}


def latent_stats(latents: dict) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training latents: the VAE config's latents_mean/std (Wan normalises by them)."""
    z = latents["mean"].transpose(0, 1).flatten(1)
    return z.mean(1).tolist(), z.std(1).tolist()


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Uniform draws mapped as Wan's flow-matching schedulers shift their sigmas."""
    return shift * u / (1 + (shift - 1) * u)


def train_transformer(
    recipe: GeneratorRecipe, latents: dict, stats: tuple[list[float], list[float]], work: Path, report=print
) -> WanTransformer3DModel:
    torch.manual_seed(recipe.seed + 1)
    model = build_transformer(recipe).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), recipe.lr, weight_decay=0.01)
    ckpt, log = Checkpoint(work / "transformer.pt", recipe.checkpoint_every), LossLog(work / "log.jsonl", "transformer")
    start = ckpt.load(model=model, ema=ema, opt=opt)
    log.rewind(start)
    mean, std = (torch.tensor(s).view(1, -1, 1, 1, 1) for s in stats)
    fed = recipe.text_tokens_fed or recipe.text_tokens
    embeds = F.pad(latents["embeds"], (0, 0, 0, fed - latents["embeds"].shape[1]))
    # Attention over `fed` text rows with a key bias equals attention over the full padding (cvg.models.padding).
    text_bias = TextBias()

    def flow_loss(gen: torch.Generator, count: int, frames: int | None) -> torch.Tensor:
        """Flow-matching loss on `count` training latents (their first `frames` latent frames; None: all)."""
        idx = torch.randint(0, len(latents["prompt"]), (count,), generator=gen)
        posterior_mean, posterior_std = (latents[k][idx, :, :frames].float() for k in ("mean", "std"))
        z = posterior_mean + posterior_std * torch.randn(posterior_mean.shape, generator=gen)
        z = ((posterior_mean if recipe.target == "mean" else z) - mean) / std
        dropped = torch.rand(count, generator=gen) < recipe.text_dropout
        prompt = latents["prompt"][idx].masked_fill(dropped, 0)
        text, text_bias.key_bias = collapse_padding(embeds[prompt], fed, total=recipe.text_tokens)
        sigma = flow_sigmas(torch.rand(count, generator=gen), recipe.shift).view(-1, 1, 1, 1, 1)
        noise = torch.randn(z.shape, generator=gen)
        noisy = (1 - sigma) * z + sigma * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            pred = model(noisy, sigma.flatten() * 1000, text, return_dict=False)[0]
        weight = 1 + (recipe.latent_object_weight - 1) * latents["objects"][idx, :, :frames].float()
        return (weight * (pred.float() - (noise - z)) ** 2).mean() / weight.mean()

    t0 = time.perf_counter()
    with text_key_bias(model, [KeyBiasWanAttnProcessor(text_bias) for _ in model.blocks]):
        for step in range(start, recipe.steps):
            gen = seeded(recipe.seed, 3, step)
            loss = flow_loss(gen, recipe.batch, None)
            if recipe.image_batch:  # frame 0's latent alone is the image the causal VAE encodes it as
                loss = (loss + recipe.image_weight * flow_loss(gen, recipe.image_batch, 1)) / (1 + recipe.image_weight)
            for group in opt.param_groups:
                group["lr"] = recipe.lr * cosine_schedule(step, recipe.steps, recipe.warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1 - recipe.ema)
            log.write(step + 1, loss=loss.item())
            if (step + 1) % 50 == 0:
                report(
                    f"transformer step {step + 1}/{recipe.steps} loss {loss.item():.4f} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
            ckpt.save(step + 1, done=step + 1 == recipe.steps, model=model, ema=ema, opt=opt)
    return ema


def assemble(
    recipe: GeneratorRecipe,
    vae: AutoencoderKLWan,
    transformer: WanTransformer3DModel,
    tokenizer=None,
    text_encoder=None,
) -> WanPipeline:
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=recipe.shift
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_generator(out: str | os.PathLike, recipe: GeneratorRecipe = GeneratorRecipe(), report=print) -> dict:
    """Train (or resume) all three stages and save the pipeline to `out`; returns the manifest."""
    out = Path(out)
    work = out / ".work"
    if out.is_dir() and not work.is_dir() and any(out.iterdir()):  # a model, or anything else, not ours
        raise ValueError(f"{out} is not empty and no training run started there (no .work); give a new directory")
    work.mkdir(parents=True, exist_ok=True)
    with locked(work / LOCK, wait=False):  # one trainer per output: a second is refused, naming the first
        return _train_generator(out, work, recipe, report)


def _train_generator(out: Path, work: Path, recipe: GeneratorRecipe, report) -> dict:
    check_resumable(work, recipe)
    write_text_atomic(work / "recipe.json", json.dumps(asdict(recipe), indent=1))
    tokenizer, text_encoder = load_minilm()
    timings = {}
    t = time.perf_counter()
    vae = train_vae(recipe, work, report).requires_grad_(False)
    timings["vae_s"] = time.perf_counter() - t
    t = time.perf_counter()
    text = assemble(recipe, vae, build_transformer(recipe), tokenizer, text_encoder)
    latents = encode_latents(recipe, vae, text, work, report)
    stats = latent_stats(latents)
    timings["latents_s"] = time.perf_counter() - t
    t = time.perf_counter()
    transformer = train_transformer(recipe, latents, stats, work, report)
    timings["transformer_s"] = time.perf_counter() - t
    save_generator(
        recipe,
        vae,
        transformer,
        stats,
        out,
        {
            "timings": timings,
            "training_prompts": len(latents["embeds"]) - 1,
            **({"vae_init_sha256": file_digest(recipe.vae_init)} if recipe.vae_init else {}),
        },
    )
    plot_losses(work / "log.jsonl", out / "loss.png")
    return json.loads((out / MANIFEST).read_text())


def snapshot_generator(out: str | os.PathLike, dest: str | os.PathLike, report=print) -> dict:
    """The run in OUT as it stands: its VAE and the transformer's EMA weights at the last checkpoint, saved
    to DEST (a new directory) as the finished run would save them, to judge a run before it ends."""
    work, dest = Path(out) / ".work", Path(dest)
    if not (work / "transformer.pt").is_file():
        raise ValueError(f"{out}: no transformer checkpoint yet (OUT/.work/transformer.pt); nothing to snapshot")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty directory; give a new one")
    recipe = GeneratorRecipe.from_file(work / "recipe.json")
    tokenizer, text_encoder = load_minilm()
    vae = train_vae(recipe, work, report).requires_grad_(False)  # both stages are done: their checkpoints load
    text = assemble(recipe, vae, build_transformer(recipe), tokenizer, text_encoder)
    stats = latent_stats(encode_latents(recipe, vae, text, work, report))
    saved = torch.load(work / "transformer.pt", weights_only=True)
    transformer = build_transformer(recipe)
    transformer.load_state_dict(saved["ema"])
    save_generator(recipe, vae, transformer, stats, dest, {"snapshot_step": saved["step"]})
    return json.loads((dest / MANIFEST).read_text())


def save_generator(
    recipe: GeneratorRecipe,
    vae: AutoencoderKLWan,
    transformer: WanTransformer3DModel,
    stats: tuple[list[float], list[float]],
    out: Path,
    manifest: dict,
) -> None:
    """Save the pipeline, its VAE normalising by the training latents' `stats`, without the text encoder and
    tokenizer; the manifest (the recipe and `manifest`) names the package that holds them."""
    vae.register_to_config(latents_mean=stats[0], latents_std=stats[1])
    assemble(recipe, vae, transformer).save_pretrained(str(out))
    manifest = {"text_encoder": PACKAGE, "recipe": asdict(recipe), **manifest}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
