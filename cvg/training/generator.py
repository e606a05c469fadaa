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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from cvg.compshapes.dataset import split_clip
from cvg.compshapes.grammar import ALL_CATEGORIES, sealed
from cvg.compshapes.world import BACKGROUND, render
from cvg.io.files import file_digest, locked, write_text_atomic
from cvg.models.minilm import PACKAGE, load_minilm
from cvg.models.padding import collapse_padding
from cvg.models.processors import KeyBiasWanAttnProcessor, TextBias, text_key_bias
from cvg.models.wan import MANIFEST, model_key, to_pixels
from cvg.training.loop import Checkpoint, LossLog, cached_chunks, cosine_schedule, plot_losses


@dataclass(frozen=True)
class GeneratorRecipe:
    """Everything that decides the trained generator, saved beside it."""

    seed: int = 0
    frames: int = 17
    size: int = 64
    # VAE
    vae_base_dim: int = 16
    z_dim: int = 8
    vae_steps: int = 2400
    vae_batch: int = 2
    vae_window: int = 17  # frames per training window: whole clips, so later chunks learn the causal cache
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5  # small: a sharp posterior; Wan normalises the latent scale anyway
    object_weight: float = 10.0  # object pixels count this many times a background pixel
    vae_extra_motion: bool = True  # motion every other VAE clip (see VAE_CATEGORIES)
    # Pixels this close to an object (Chebyshev distance) weigh as the object's own. At 0 only the object's
    # pixels weigh `object_weight`, so painting its colour over the background costs a tenth of leaving a
    # hole in it: the VAE learned to dilate, and crosses came back as diamonds (fourth version).
    object_margin: int = 0
    # A VAE checkpoint (a stage file of an earlier run, e.g. training/generator-v4/vae_refine.pt) loaded
    # before the first stage; with `vae_steps` 0 the run goes straight to the refinement from it.
    vae_init: str | None = None
    # A second VAE stage from the first's weights (fresh optimiser, fresh clips): more steps at a lower
    # rate with frame 0 weighted up (the causal VAE gives it a latent frame of its own, drawn worst).
    vae_refine_steps: int = 1500
    vae_refine_lr: float = 5e-4
    first_frame_weight: float = 4.0  # frame 0's pixels count this many times another frame's (refine only)
    # transformer
    clips: int = 6000  # training clips encoded to latents
    heads: int = 6
    head_dim: int = 32
    layers: int = 4
    ffn_dim: int = 768
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.995
    text_dropout: float = 0.1
    text_tokens: int = 512  # WanPipeline's default max_sequence_length: the model is trained for it
    text_tokens_fed: int | None = 32  # fewer keys per step, same maths (`cvg.models.padding`); None: all
    target: str = "mean"  # "sample" a latent from the VAE posterior, or take its "mean"
    shift: float = 3.0  # flow shift, in training sigmas and in the shipped scheduler
    # Objects fill a few percent of the latent; their cells (any object pixel in the cell's frames) count
    # this many times a background cell in the flow loss, so capacity goes to drawing them.
    latent_object_weight: float = 5.0
    # Transformer forward under bfloat16 autocast (weights, loss and optimiser stay float32): only where the
    # CPU has bf16 instructions (without avx512_bf16 or AMX a bf16 matmul runs ~100x slower than float32).
    bf16: bool = False
    checkpoint_every: int = 100

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneratorRecipe:
        """A recipe saved as JSON (a run's `.work/recipe.json`, or one kept under training/)."""
        try:
            fields = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"recipe {path}: {e}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"recipe {path}: expected a JSON object of GeneratorRecipe fields")
        if unknown := sorted(set(fields) - set(cls.__dataclass_fields__)):
            raise ValueError(f"recipe {path}: unknown fields {', '.join(unknown)}")
        return cls(**fields)


# Which recipe fields each stage's result depends on: a resumed run may change the fields of stages that
# have not started (the transformer's while the VAE trains), never those of a stage with a checkpoint.
_VAE_FIELDS = ("seed", "frames", "size", "vae_base_dim", "z_dim", "vae_steps", "vae_batch", "vae_window", "vae_lr")
_VAE_LOSS_FIELDS = ("kl_weight", "object_weight", "object_margin", "vae_extra_motion", "vae_init")
STAGE_FIELDS = {
    "vae.pt": (*_VAE_FIELDS, *_VAE_LOSS_FIELDS),
    "vae_refine.pt": (*_VAE_LOSS_FIELDS, "vae_refine_steps", "vae_refine_lr", "first_frame_weight"),
    "latents": ("clips", "object_margin"),
}


def _seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


def build_vae(recipe: GeneratorRecipe) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=recipe.vae_base_dim,
        z_dim=recipe.z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * recipe.z_dim,
        latents_std=[1.0] * recipe.z_dim,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )


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


# With `vae_extra_motion` the VAE sees motion every other clip: four of five categories are static, and a
# causal video VAE trained on them learns to copy the previous frame, so fast-moving objects stay put when
# decoded. (Measured: it fixes motion but, at z_dim 16 and this budget, shifted red to orange; see docs.)
LOCK = ".lock"  # in OUT/.work: held by the one trainer of OUT
VAE_CATEGORIES = tuple(c for other in ALL_CATEGORIES if other != "motion" for c in ("motion", other))


def training_clips(recipe: GeneratorRecipe, stage: int, first: int, count: int, categories=ALL_CATEGORIES):
    """Clips `first..first+count-1` of a stage's stream, categories in turn, training prompts only."""
    size = {"frames": recipe.frames, "height": recipe.size, "width": recipe.size}
    return list(
        sealed(
            split_clip(recipe.seed * 1000 + stage, i, categories[i % len(categories)], "train", **size)
            for i in range(first, first + count)
        )
    )


def train_vae(recipe: GeneratorRecipe, work: Path, report: Callable[[str], None] = print) -> AutoencoderKLWan:
    """The VAE's two stages: from scratch (`vae.pt`), then refined from its weights (`vae_refine.pt`)."""
    torch.manual_seed(recipe.seed)
    vae = build_vae(recipe).train()
    if recipe.vae_init:
        vae.load_state_dict(load_vae_checkpoint(recipe.vae_init))
    _vae_stage(recipe, vae, work, "vae", recipe.vae_steps, recipe.vae_lr, 1, 1.0, report)
    if recipe.vae_refine_steps:  # from the first stage's final weights, which `vae` now holds
        first = recipe.first_frame_weight
        _vae_stage(recipe, vae, work, "vae_refine", recipe.vae_refine_steps, recipe.vae_refine_lr, 4, first, report)
    return vae.eval()


def load_vae_checkpoint(path: str | os.PathLike) -> dict:
    """The VAE weights of a stage checkpoint (`vae.pt` or `vae_refine.pt` of a run)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"vae_init {path}: no such file (paths are read from the working directory)")
    saved = torch.load(path, weights_only=True)
    if "vae" not in saved:
        raise ValueError(f"vae_init {path}: not a VAE stage checkpoint (no 'vae' entry)")
    return saved["vae"]


def near_objects(drawn: torch.Tensor, margin: int) -> torch.Tensor:
    """`drawn` (bool [..., H, W]) grown by `margin` pixels in H and W: every pixel that close to an object."""
    if margin == 0:
        return drawn
    shape = drawn.shape
    grown = F.max_pool2d(drawn.reshape(-1, 1, *shape[-2:]).float(), 2 * margin + 1, stride=1, padding=margin)
    return grown.reshape(shape) > 0


def _vae_stage(recipe, vae, work: Path, name: str, steps: int, lr: float, stream: int, first_frame: float, report):
    """Train `vae` for `steps` (resumable from WORK/NAME.pt): clips of stream `stream`, weighted L1 + KL."""
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    ckpt, log = Checkpoint(work / f"{name}.pt", recipe.checkpoint_every), LossLog(work / "log.jsonl", name)
    start = ckpt.load(vae=vae, opt=opt)
    log.rewind(start)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1
    categories = VAE_CATEGORIES if recipe.vae_extra_motion else ALL_CATEGORIES
    t0 = time.perf_counter()
    for step in range(start, steps):
        gen = _seeded(recipe.seed, stream, step)
        clips = training_clips(recipe, stream, step * recipe.vae_batch, recipe.vae_batch, categories)
        offset = int(torch.randint(0, recipe.frames - recipe.vae_window + 1, (), generator=gen))
        x = to_pixels([render(c.scene)[offset : offset + recipe.vae_window] for c in clips])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # Objects are a few percent of the pixels; weigh them up so the background does not win.
        drawn = near_objects((x - background).abs().amax(1, keepdim=True) > 0.05, recipe.object_margin)
        weight = 1 + (recipe.object_weight - 1) * drawn.float()
        if offset == 0 and first_frame != 1.0:
            weight[:, :, 0] *= first_frame
        rec = (weight * (recon - x).abs()).mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
        loss = rec + recipe.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = lr * cosine_schedule(step, steps, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log.write(step + 1, loss=rec.item(), kl=kl.item())
        if (step + 1) % 50 == 0:
            report(f"{name} step {step + 1}/{steps} recon {rec.item():.4f} ({time.perf_counter() - t0:.0f} s)")
        ckpt.save(step + 1, done=step + 1 == steps, vae=vae, opt=opt)


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
    t0 = time.perf_counter()
    with text_key_bias(model, [KeyBiasWanAttnProcessor(text_bias) for _ in model.blocks]):
        for step in range(start, recipe.steps):
            gen = _seeded(recipe.seed, 3, step)
            idx = torch.randint(0, len(latents["prompt"]), (recipe.batch,), generator=gen)
            posterior_mean, posterior_std = latents["mean"][idx].float(), latents["std"][idx].float()
            z = posterior_mean + posterior_std * torch.randn(posterior_mean.shape, generator=gen)
            z = ((posterior_mean if recipe.target == "mean" else z) - mean) / std
            dropped = torch.rand(recipe.batch, generator=gen) < recipe.text_dropout
            prompt = latents["prompt"][idx].masked_fill(dropped, 0)
            text, text_bias.key_bias = collapse_padding(embeds[prompt], fed, total=recipe.text_tokens)
            sigma = flow_sigmas(torch.rand(recipe.batch, generator=gen), recipe.shift).view(-1, 1, 1, 1, 1)
            noise = torch.randn(z.shape, generator=gen)
            noisy = (1 - sigma) * z + sigma * noise
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                pred = model(noisy, sigma.flatten() * 1000, text, return_dict=False)[0]
            weight = 1 + (recipe.latent_object_weight - 1) * latents["objects"][idx].float()
            loss = (weight * (pred.float() - (noise - z)) ** 2).mean() / weight.mean()
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
    vae.register_to_config(latents_mean=stats[0], latents_std=stats[1])
    save_generator(
        assemble(recipe, vae, transformer),
        out,
        {
            "recipe": asdict(recipe),
            "timings": timings,
            "training_prompts": len(latents["embeds"]) - 1,
            **({"vae_init_sha256": file_digest(recipe.vae_init)} if recipe.vae_init else {}),
        },
    )
    plot_losses(work / "log.jsonl", out / "loss.png")
    return json.loads((out / MANIFEST).read_text())


def check_resumable(work: Path, recipe: GeneratorRecipe) -> None:
    """Refuse to resume a run whose finished or started stages had other recipe fields (named)."""
    path = work / "recipe.json"
    if not path.is_file():
        return
    stored, asked = json.loads(path.read_text()), asdict(recipe)
    changed = {k for k in {*stored, *asked} if stored.get(k) != asked.get(k)}
    started = [stage for stage in (*STAGE_FIELDS, "transformer.pt") if (work / stage).exists()]
    fixed = set().union(*(STAGE_FIELDS.get(s, asked) for s in started)) if started else set()
    if "latents" in started or "transformer.pt" in started:
        fixed |= set(STAGE_FIELDS["vae.pt"])  # later stages read the VAE
    if clash := sorted(changed & fixed):
        detail = ", ".join(f"{k}={stored.get(k)!r} (asked {asked.get(k)!r})" for k in clash)
        raise ValueError(f"{work} holds a run started with {detail}; resume with those or train into another directory")


def save_generator(pipe: WanPipeline, out: Path, manifest: dict) -> None:
    """Save without the text encoder and tokenizer; the manifest names the package that holds them."""
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer, scheduler=pipe.scheduler
    )
    pipe.save_pretrained(str(out))
    write_text_atomic(out / MANIFEST, json.dumps({"text_encoder": PACKAGE, **manifest}, indent=1))
