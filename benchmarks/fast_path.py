"""The fast path on the shipped model: the transformer in bf16, classifier-free guidance as one batch of two
and the unguided steps on the compiled engine, against the float32 eager default, unguided and guided (the
shipped classifier, default guidance), at 64x64x17, 20 steps, CFG 5; every variant in turn per clip (same
prompts, same seeds), phases as `CVGOutput.timings` gives them. The fast path with a bf16 VAE decode is
measured too, with the largest pixel change it makes to the fast path's clips.

    python benchmarks/fast_path.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import statistics

import torch
from shipped import MODELS, dev_clips, parser, timed

from cvg.measure import machine_line, publish
from cvg.models.wan import load_wan_pipeline
from cvg.pipeline import CVGPipeline

FAST = {"engine": "compiled", "batch_cfg": True}
PATHS = {"float32 eager (default)": {}, "fast path": FAST, "fast path, bf16 VAE": FAST}
PHASES = ("text_encoding", "guided_steps", "unguided_steps", "vae_decode")


def main() -> None:
    args = parser(__doc__, clips=8).parse_args()
    pipes = {}
    for path, options in PATHS.items():
        dtype = torch.bfloat16 if options else torch.float32
        vae_dtype = torch.bfloat16 if "bf16 VAE" in path else torch.float32
        base = load_wan_pipeline(MODELS / "compshapes-wan", transformer_dtype=dtype, vae_dtype=vae_dtype)
        base.set_progress_bar_config(disable=True)
        pipe = CVGPipeline(base, **options)
        pipe.load_classifier(MODELS / "compshapes-classifier")
        pipes[path] = pipe
    variants = [(path, guided) for path in PATHS for guided in (False, True)]
    first, runs = {}, {v: [] for v in variants}
    frames, vae_change = {}, 0.0
    for i, clip in dev_clips(args.clips):
        for path, guided in variants:
            elapsed, out = timed(pipes[path], clip, i, composition=guided)
            frames[path, guided] = out.frames
            if path == "fast path, bf16 VAE":
                change = abs(out.frames.astype(float) - frames["fast path", guided].astype(float)).max() * 255
                vae_change = max(vae_change, float(change))
            if i:
                runs[path, guided].append({"total": elapsed, **out.timings})
            else:  # the first generation of each: the engine build is in it
                first[path, guided] = elapsed
    median = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    lines = [
        f"The fast path against the default on the shipped model, {machine_line()}: 64x64x17, 20 steps, CFG 5, "
        f"guided = the shipped classifier at the default guidance; medians of {args.clips} held-out prompts, each "
        "variant in turn; first call = the warm-up generation (engine build included). The bf16 VAE changed "
        f"the fast path's pixels by at most {vae_change:.1f} of 255 levels.",
        "",
        "| path | guidance | first call (s) | s per clip | text (s) | guided steps (s) | unguided steps (s) "
        "| VAE decode (s) | / float32 eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    default = next(iter(PATHS))
    for path, guided in variants:
        m = median[path, guided]
        phases = " | ".join(f"{m[p]:.3f}" for p in PHASES)
        lines.append(
            f"| {path} | {'guided' if guided else 'unguided'} | {first[path, guided]:.1f} | {m['total']:.3f} "
            f"| {phases} | {m['total'] / median[default, guided]['total']:.2f} |"
        )
    publish("Command: `python benchmarks/fast_path.py`\n\n" + "\n".join(lines), args.write, "fast_path")


if __name__ == "__main__":
    main()
