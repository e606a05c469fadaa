"""`python -m cvg.bench`: one generation, phase by phase, against diffusers and a naive guidance baseline.

Variants, all on the same tiny Wan pipeline (random weights, real MiniLM text encoder), same seed:
  diffusers           WanPipeline.__call__, unguided
  unguided            CVGPipeline without guidance
  guided              CVGPipeline, `guide_steps` guided steps, maps through attention_pool (torch backend)
  naive-guided        the same guidance done the way Attend-and-Excite does it: its processor replaces
                      every attention (self and cross) for the whole run and computes each one's full
                      softmax P (`get_attention_scores`), storing the cross-attention maps; here the
                      self-attention runs diffusers' `_native_math` backend (P materialised) and the
                      cross-attention the naive attention_pool backend
  naive-cross-guided  a stronger baseline: only the cross-attention materialises P (self-attention fused)
  guided+BACKEND      guided, the unguided steps on a step engine (--backends)
  unguided@DTYPE..., guided@DTYPE...  the transformer in DTYPE (--dtypes): eager, +batch-cfg, +batch-cfg+ENGINE
                      (--fast-engine), +batch-cfg+fbc=0.1 (diffusers' FirstBlockCache on the unguided steps)

The default rows and size take under 3 minutes on 2 CPU cores; step backends and other precisions are flags
(`--help` says what each costs). Each row is printed as it is measured. Times: every variant in turn in one
fresh process (with TIMING_ENV), `--repeats` rounds after a warm-up, medians. Peak memory: each variant in a fresh
process (see cvg.measure), above the loaded pipeline, for the denoising phase
(text encoding and every step) and for the VAE decode apart. Ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from cvg import threads
from cvg.io.files import write_text_atomic
from cvg.measure import ISOLATED_ENV, json_child, machine_line, peak_extra_bytes, write_section
from cvg.runtime import STEP_BACKENDS

VARIANTS = ("diffusers", "unguided", "guided", "naive-guided", "naive-cross-guided")
PHASES = ("text_encoding", "guided_steps", "unguided_steps", "vae_decode")
# Timing runs keep freed memory mapped (glibc otherwise returns it, and how much depends on what ran
# before: the VAE decode took 0.7 s after the naive variant and 1.2-1.6 s after the others).
TIMING_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(1 << 25)}
PROMPT, COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvg.bench", description=__doc__.split("\n\n")[0])
    size = parser.add_argument_group(
        "size (the defaults: 159 s in all, the first row at 54 s, on 2 cores of an AMD EPYC without bf16 units)"
    )
    size.add_argument("--height", type=int, default=128, help="video height (default 128)")
    size.add_argument("--width", type=int, default=128, help="video width (default 128)")
    size.add_argument("--frames", type=int, default=17, help="video frames (default 17: 5 latent frames)")
    size.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    size.add_argument("--guide-steps", type=int, default=2, help="guided steps (default 2)")
    size.add_argument("--text-tokens", type=int, default=512, help="text length; Wan pads to it (default 512)")
    size.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    size.add_argument("--heads", type=int, default=12, help="attention heads (default 12)")
    size.add_argument("--head-dim", type=int, default=16, help="head dim (default 16)")
    size.add_argument("--ffn-dim", type=int, default=384, help="feed-forward width (default 384)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    heavy = parser.add_argument_group("heavy rows (off by default; `make bench` runs them for RESULTS.md)")
    heavy.add_argument(
        "--backends",
        type=lambda t: [b for b in t.split(",") if b],
        default=[],
        help="step backends timed for guided generation, e.g. onnxruntime,compiled: a row each, its build "
        "(an ONNX export or a torch.compile, about a minute each on 2 CPU cores) in its first call",
    )
    heavy.add_argument(
        "--dtypes",
        type=lambda t: [d for d in t.split(",") if d],
        default=[],
        help="transformer precisions timed besides float32, e.g. bfloat16: 8 rows each (eager, batched CFG, "
        "a step backend, a step cache; unguided and guided), minutes on CPUs with bf16 units, and far longer "
        "on CPUs without them (avx2 only: bf16 matmuls emulated, ~100x slower)",
    )
    heavy.add_argument(
        "--fast-engine",
        choices=STEP_BACKENDS,
        default="compiled",
        help="step backend of the precision rows' fast path (default compiled)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    parser.add_argument("--memory", choices=VARIANTS, help=argparse.SUPPRESS)  # child process modes
    parser.add_argument("--times", metavar="ROWS", help=argparse.SUPPRESS)
    return parser


def _runner(variant: str, args: argparse.Namespace):
    """`run(output_type)` generating once with `variant` and returning (phase timings, output), and the pipeline."""

    from cvg.guidance.config import GuidanceConfig
    from cvg.models.processors import record_maps
    from cvg.models.tiny import tiny_wan_pipeline
    from cvg.models.wan import cast_transformer
    from cvg.pipeline import CVGPipeline
    from cvg.request import PipelineOptions

    variant, dtype, engine, batch_cfg, threshold = _options(variant)
    pipe = tiny_wan_pipeline(0, args.layers, args.heads, args.head_dim, args.ffn_dim)
    if dtype:
        cast_transformer(pipe.transformer, getattr(torch, dtype))
    common = dict(
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        max_sequence_length=args.text_tokens,
    )
    naive = variant.startswith("naive")
    if variant == "naive-guided":
        for block in pipe.transformer.blocks:
            block.attn1.set_attention_backend("_native_math")
    # The naive baselines attend over the whole padded text, as Attend-and-Excite does.
    config = GuidanceConfig(
        guide_steps=args.guide_steps, backend="naive" if naive else "auto", collapse_padding=not naive
    )
    cache = tempfile.mkdtemp(prefix="cvg-bench-engines-") if engine else None  # cold: the build is timed
    options = PipelineOptions(
        step_backend=engine, backend_cache=cache, batch_cfg=batch_cfg, first_block_cache=threshold
    )
    cvg = CVGPipeline(pipe, guidance=config, options=options)
    tokens = cvg.bind(PROMPT, COMPOSITION, args.text_tokens).tokens

    def run(output_type: str = "np"):
        generator = torch.Generator().manual_seed(0)
        if variant == "diffusers":
            start = time.perf_counter()
            frames = pipe(PROMPT, generator=generator, output_type=output_type, **common).frames
            return {"total": time.perf_counter() - start}, frames
        store = record_maps(pipe.transformer, tokens, pool=config.pool, backend="naive") if naive else nullcontext()
        with store:
            out = cvg(
                PROMPT,
                None if variant == "unguided" else COMPOSITION,
                generator=generator,
                output_type=output_type,
                **common,
            )
        return {**out.timings, "total": sum(out.timings.values())}, out.frames

    return run, pipe


def _rows(args: argparse.Namespace) -> list[str]:
    return [*VARIANTS, *(f"guided+{b}" for b in args.backends), *_dtype_variants(args)]


def _measure_times(rows: list[str], args: argparse.Namespace) -> None:
    """Each row in turn: `--repeats` rounds after a warm-up (in which a step backend builds), printed as one
    JSON line as soon as it is measured."""
    for variant in rows:
        run = _runner(variant, args)[0]
        first = run()[0]["total"]
        rounds = [{**run()[0], "first_call": first} for _ in range(args.repeats)]
        print(json.dumps({"variant": variant, "rounds": rounds}), flush=True)
        del run  # one variant's pipeline at a time


def measured_times(rows: list[str], args: argparse.Namespace) -> Iterator[tuple[str, list[dict[str, float]]]]:
    """(variant, rounds) as each row is measured, in one fresh process started with TIMING_ENV."""
    argv = ["-m", "cvg.bench", *_size_argv(args), "--repeats", str(args.repeats), "--times", ",".join(rows)]
    with tempfile.TemporaryFile("w+") as errors:
        env = {**os.environ, **TIMING_ENV}
        with subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=errors, text=True
        ) as child:
            for line in child.stdout:
                row = json.loads(line)
                yield row["variant"], row["rounds"]
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"the timing run failed: {errors.read().strip().splitlines()[-1:]}")


def _row_line(variant: str, rounds: list[dict[str, float]], memory: dict[str, int] | None) -> str:
    total = statistics.median(r["total"] for r in rounds)
    peak = "" if memory is None else f", peak {max(memory.values()) / 2**20:.1f} MiB above the loaded pipeline"
    first = rounds[0]["first_call"]
    return f"{variant}: {total:.3f} s a generation (median of {len(rounds)}; first call {first:.2f} s){peak}"


def _options(variant: str) -> tuple[str, str | None, str | None, bool, float | None]:
    """(unguided/guided/..., dtype, step engine, batched CFG, FirstBlockCache threshold) of a variant name:
    "guided", "guided+onnxruntime", "unguided@bfloat16+batch-cfg+compiled", "guided@bfloat16+fbc=0.1"."""
    head, *options = variant.split("+")
    base, _, dtype = head.partition("@")
    engine = next((o for o in options if o in STEP_BACKENDS), None)
    threshold = next((float(o.removeprefix("fbc=")) for o in options if o.startswith("fbc=")), None)
    return base, dtype or None, engine, "batch-cfg" in options, threshold


def _dtype_variants(args: argparse.Namespace) -> list[str]:
    """Per precision: eager, batched CFG, batched on the fast-path engine, and batched with diffusers'
    FirstBlockCache on the unguided steps."""
    options = ("", "+batch-cfg", f"+batch-cfg+{args.fast_engine}", "+batch-cfg+fbc=0.1")
    return [f"{v}@{d}{o}" for d in args.dtypes for o in options for v in ("unguided", "guided")]


def _memory_child(variant: str, args: argparse.Namespace) -> dict[str, int]:
    """Peak bytes above the loaded pipeline: denoising (text encoding and all steps), then VAE decode."""
    from cvg.models.wan import decode_latents

    run, pipe = _runner(variant, args)
    run()  # warm-up
    (_, latents), denoise_peak = peak_extra_bytes(lambda: run("latent"))
    _, decode_peak = peak_extra_bytes(lambda: decode_latents(pipe, latents, "np"))
    return {"denoise": denoise_peak, "decode": decode_peak}


def measure_memory(variant: str, args: argparse.Namespace) -> dict[str, int]:
    """Peak bytes of one generation's phases, in a fresh process started with ISOLATED_ENV."""
    return json_child(
        ["-m", "cvg.bench", *_size_argv(args), "--memory", variant], ISOLATED_ENV, f"memory run of {variant}"
    )


def _size_argv(args: argparse.Namespace) -> list[str]:
    keys = (
        "height",
        "width",
        "frames",
        "steps",
        "guide_steps",
        "text_tokens",
        "layers",
        "heads",
        "head_dim",
        "ffn_dim",
        "guidance_scale",
    )
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def table(times: dict, memory: dict, args: argparse.Namespace) -> str:
    median = {v: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for v, rounds in times.items()}
    peak = {v: max(m.values()) for v, m in memory.items()}
    base = median["unguided"]["total"]
    lines = [
        f"cvg.bench, {machine_line()}, median of {args.repeats}: {' '.join(_size_argv(args))}",
        "",
        "| variant | total (s) | text (s) | guided steps (s) | unguided steps (s) | VAE decode (s) "
        "| peak MiB, denoising | peak MiB, decode | time / unguided | time / naive-guided "
        "| denoising memory / naive-guided | peak memory / naive-guided | time / naive-cross-guided "
        "| denoising memory / naive-cross-guided | peak memory / naive-cross-guided |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        m = median[v]
        phases = " | ".join(f"{m[p]:.3f}" if p in m else "-" for p in PHASES)
        ratios = " | ".join(
            f"{m['total'] / median[b]['total']:.2f} | {memory[v]['denoise'] / memory[b]['denoise']:.3f} | "
            f"{peak[v] / peak[b]:.3f}"
            for b in ("naive-guided", "naive-cross-guided")
        )
        lines.append(
            f"| {v} | {m['total']:.3f} | {phases} | {memory[v]['denoise'] / 2**20:.1f} | "
            f"{memory[v]['decode'] / 2**20:.1f} | {m['total'] / base:.2f} | {ratios} |"
        )
    return "\n".join(lines)


def engine_table(times: dict, args: argparse.Namespace) -> str:
    """Guided generation with the later steps on each step engine, against eager (diffusers' own forward)."""
    median = {v: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for v, rounds in times.items()}
    unguided_steps = args.steps - args.guide_steps
    eager_step = median["guided"]["unguided_steps"] / unguided_steps
    lines = [
        "| variant | first call (s) | total (s) | unguided step (s) | steps/s | clips/s | step speedup over eager "
        "| end-to-end speedup over guided eager |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in ("guided", *(f"guided+{b}" for b in args.backends)):
        m = median[v]
        step = m["unguided_steps"] / unguided_steps
        lines.append(
            f"| {v} | {m['first_call']:.2f} | {m['total']:.3f} | {step:.4f} | {1 / step:.1f} | {1 / m['total']:.2f} "
            f"| {eager_step / step:.2f} | {median['guided']['total'] / m['total']:.2f} |"
        )
    return "\n".join(lines)


def dtype_table(times: dict, args: argparse.Namespace) -> str:
    """Unguided and guided generation with the transformer in each precision, against float32: unguided
    against diffusers' eager float32 pipeline, guided against the float32 guided eager path."""
    median = {v: statistics.median(r["total"] for r in rounds) for v, rounds in times.items()}
    lines = [
        "| variant | dtype | engine | batched CFG | step cache | first call (s) | total (s) | text (s) "
        "| guided steps (s) | unguided steps (s) | VAE decode (s) | speedup over float32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in ("unguided", "guided", *_dtype_variants(args)):
        name, dtype, engine, batch_cfg, threshold = _options(v)
        base = "diffusers" if name == "unguided" else "guided"
        m = {k: statistics.median(r[k] for r in times[v]) for k in (*PHASES, "first_call")}
        cache = "-" if threshold is None else f"FirstBlockCache {threshold:g}"
        phases = " | ".join(f"{m[p]:.3f}" for p in PHASES)
        lines.append(
            f"| {name} | {dtype or 'float32'} | {engine or 'eager'} | {'yes' if batch_cfg else 'no'} | {cache} "
            f"| {m['first_call']:.2f} | {median[v]:.3f} | {phases} | {median[base] / median[v]:.2f} (over {base}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    threads.configure()
    args = _parser().parse_args(argv)
    if args.memory:
        print(json.dumps(_memory_child(args.memory, args)))
        return
    if args.times:
        _measure_times(args.times.split(","), args)
        return
    times, memory = {}, {}
    rows = _rows(args)
    with tqdm(total=len(rows), desc="cvg.bench", unit="row", file=sys.stderr) as bar:  # a line per row measured
        for variant, rounds in measured_times(rows, args):
            times[variant] = rounds
            if variant in VARIANTS:  # the main table's memory columns: each in a fresh process of its own
                memory[variant] = measure_memory(variant, args)
            bar.write(_row_line(variant, rounds, memory.get(variant)))
            bar.update()
    text = table({v: times[v] for v in VARIANTS}, memory, args)
    print(text)
    engines = engine_table(times, args) if args.backends else ""
    print("\n" + engines if engines else "")
    precisions = dtype_table(times, args) if args.dtypes else ""
    print("\n" + precisions if precisions else "")
    if args.json:
        record = {"args": _size_argv(args), "times": times, "peak_bytes": memory}
        write_text_atomic(args.json, json.dumps(record, indent=1))
    if args.write:
        note = (
            "Peak memory is measured above the loaded pipeline, for the denoising phase (text encoding and all "
            "steps, where guidance differs) and for the VAE decode (the same code in every variant: "
            "`cvg.models.vae_cpu`'s CPU paths) apart; the peak columns compare the larger of the two. naive-guided is "
            "guidance the way Attend-and-Excite runs it: its processor replaces every attention (self and cross) "
            "for the whole run and materialises each softmax; naive-cross-guided materialises only the "
            "cross-attention (a stronger baseline). Guided steps use the defaults: every block recorded, "
            "no gradient checkpointing (its rule: only past 1 GiB of saved activations), one update per guided "
            "step, Wan's zero text padding collapsed (exact; "
            "the naive baselines attend over all 512 text tokens, as Attend-and-Excite does). The diffusers row "
            "times `WanPipeline.__call__` with diffusers' own VAE decode."
        )
        write_section(args.write, "cvg_bench", f"Command: `python -m cvg.bench`\n\n{note}\n\n{text}")
        if engines:
            engine_note = (
                "Step engines (`cvg.runtime.step_backend`): the same guided generation with its gradient-free "
                "forwards on each backend (text attention over 64 kept rows with the padding's key bias instead of "
                "512 tokens) and its guided steps through `cvg.runtime.guided_graph` (eager on CPU). First call = "
                "the first generation in the process, engine build (export or compile, from a cold cache) "
                "included; the rest are medians of the timed rounds of the same run. Speedups are over the guided "
                "row: diffusers' eager forward."
            )
            write_section(
                args.write,
                "cvg_bench_engines",
                f"Command: `python -m cvg.bench`\n\n{engine_note}\n\n{text.splitlines()[0]}\n\n{engines}",
            )
        if precisions:
            precision_note = (
                "Precision and the fast paths: the same generations with the transformer cast as "
                "`from_pretrained(dtype=)` loads it (norms, time embedding and modulation kept in float32), the "
                "VAE in float32; eager, then with batched classifier-free guidance, then batched with the "
                "unguided steps on the compiled engine (weights frozen in), then batched with diffusers' "
                "FirstBlockCache on the unguided steps. First call = the first generation in the process (engine "
                "build included). Speedups are over float32 eager in the same run: unguided rows over the "
                "diffusers row, guided over the guided row."
            )
            write_section(
                args.write,
                "cvg_bench_precision",
                f"Command: `python -m cvg.bench`\n\n{precision_note}\n\n{text.splitlines()[0]}\n\n{precisions}",
            )


if __name__ == "__main__":
    main()
