"""One prepared run on a CUDA GPU: cvg's CUDA-only tests, then timings, written as one JSON and one
Markdown table. A lent GPU machine starts bare (no diffusers, no cvg, no network), so everything it needs
travels in `.gpu/` (wheels and MiniLM's tokenizer, under the device tool's 64 MiB); docs/gpu.md has the
one device command.

    python benchmarks/gpu_check.py --prepare            # here: build .gpu/ (cvg's wheel, diffusers', the tokenizer)
    python benchmarks/gpu_check.py --dry-run            # here and in CI: the bundle, the checks and their imports
    python benchmarks/gpu_check.py --install --out DIR  # on the GPU: install from .gpu/, run, write DIR/gpu_check.*

Each check runs in its own process under its own timeout, inside one overall budget; a check that
cannot run there (no CUDA, no tensorrt, out of time) is reported as skipped with the reason. The exit
status is 1 only when a check fails (a test, a parity check, a crash), never because a timing is slow.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".gpu"
SITE = Path("/tmp/cvg-gpu-site")  # where --install puts the wheels on the GPU machine
CARRY_LIMIT = 64 << 20  # the device tool's limit on what travels, the working tree included
# What the GPU machine's image lacks (docs/gpu.md): cvg itself and the diffusers release cvg is tested on.
WHEELS = ("cvg", "diffusers")
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
CUDA_TESTS = ("tests/gpu/test_cuda_only.py", "tests/runtime/test_guided_graph.py", "tests/runtime/test_engine.py")
MiB = 1 << 20


# --- the checks: each runs in a child process and returns its results; `skipped` raises Skipped ---------------


class Skipped(Exception):
    """The check cannot run here; the message says why."""


def _cuda():
    import torch

    if not torch.cuda.is_available():
        raise Skipped("no CUDA device")
    return torch


def check_environment(smoke: bool) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "diffusers", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    import cvg

    info["cvg"] = str(Path(cvg.__file__).parent)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    return info


def check_cuda_tests(smoke: bool) -> dict:
    """`pytest -m cuda` over the CUDA-only tests; a failure fails the check."""
    if not smoke:
        _cuda()
    report = Path(os.environ["CVG_GPU_CHECK_TMP"]) / "junit.xml"
    argv = [sys.executable, "-P", "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = subprocess.run([*argv, *CUDA_TESTS], cwd=ROOT, capture_output=True, text=True)
    import xml.etree.ElementTree as ET

    cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
    results = {"passed": [], "failed": [], "skipped": []}
    for case in cases:
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else None
        outcome = outcome or ("skipped" if case.find("skipped") is not None else "passed")
        results[outcome].append(case.get("name"))
    if proc.returncode not in (0, 5) or results["failed"]:
        tail = "\n".join(proc.stdout.strip().splitlines()[-30:])
        raise AssertionError(f"pytest exited {proc.returncode}: {results['failed']}\n{tail}")
    return {k: sorted(v) for k, v in results.items()}


def _time(fn, reps: int) -> tuple[float, float]:
    """(median seconds, peak bytes above the start) of `fn` after one warm-up: CUDA events on a GPU."""
    import torch

    fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(reps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() - start_bytes if cuda else 0
    return sorted(times)[len(times) // 2], peak


def check_attention_pool_timing(smoke: bool) -> dict:
    """attention_pool (triton) against flash SDPA and materialised maps, forward + backward, at Wan2.1-1.3B's
    832x480x81 cross-attention (32,760 video tokens x 512 text tokens, 12 heads x 128, bf16)."""
    import torch
    import torch.nn.functional as F

    from cvg import attention_pool

    if not smoke:
        _cuda()
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    heads, n, m, d = (2, 256, 64, 32) if smoke else (12, 32760, 512, 128)
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, rows, d, device=device, dtype=dtype, generator=gen) for rows in (n, m, m))
    groups = torch.arange(n, device=device) % 64
    tokens = torch.arange(8, device=device) * 3

    def run(backend):
        def call():
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            if backend == "sdpa":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.MATH if smoke else SDPBackend.FLASH_ATTENTION):
                    out = F.scaled_dot_product_attention(qq, kk, vv)
                out.backward(torch.ones_like(out))
                return
            out, pooled = attention_pool(qq, kk, vv, groups, tokens, num_groups=64, backend=backend)
            torch.autograd.backward((out, pooled), (torch.ones_like(out), torch.ones_like(pooled)))

        return call

    rows = {}
    for backend in ("sdpa", "torch" if smoke else "triton", "naive"):
        seconds, peak = _time(run(backend), reps=3 if smoke else 10)
        rows[backend] = {"ms": seconds * 1e3, "peak_mib": peak / MiB}
    fused = "torch" if smoke else "triton"
    rows["ratios"] = {
        f"{fused} / sdpa": rows[fused]["ms"] / rows["sdpa"]["ms"],
        f"{fused} / naive (time)": rows[fused]["ms"] / rows["naive"]["ms"],
        f"{fused} / naive (memory)": rows[fused]["peak_mib"] / max(rows["naive"]["peak_mib"], 1e-9),
    }
    return {"shape": {"B": 1, "H": heads, "N": n, "M": m, "D": d, "dtype": str(dtype)}, "rows": rows}


def check_real_width_steps(smoke: bool) -> dict:
    """One unguided step, one guided step and one guided step with materialised maps of the Wan2.1-T2V-1.3B
    transformer (real config, random weights, bf16) at 832x480x81."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_width

    if not smoke:
        _cuda()
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    frames, height, width = (1, 64, 64) if smoke else real_width.FULL
    model = real_width.build_transformer(dtype, device, layers=1 if smoke else None)
    grid = real_width.video_tokens(frames, height, width)
    rows = {}
    for variant in real_width.VARIANTS:
        seconds, peak = _time(real_width.step_call(variant, model, frames, height, width), reps=3)
        modelled = sum(real_width.modelled_bytes(variant, model.config, grid, dtype.itemsize).values())
        rows[variant] = {"s": seconds, "peak_gib": peak / 2**30, "model_gib": modelled / 2**30}
    map_gib = model.config.num_attention_heads * grid[0] * grid[1] * grid[2] * real_width.TEXT_ROWS * 4 / 2**30
    return {
        "clip": f"{height}x{width}x{frames}",
        "video_tokens": grid[0] * grid[1] * grid[2],
        "rows": rows,
        "one [1, H, N, 512] float32 map tensor (GiB)": map_gib,
    }


def check_tiny_generation(smoke: bool) -> dict:
    """A full guided generation of the tiny model (64x64x17, 20 steps, the first 4 guided): eager forwards,
    the torch step engine with the guided step as a CUDA graph, and the compiled engine (reduce-overhead)."""
    import torch

    from cvg.models.tiny import tiny_wan_pipeline
    from cvg.pipeline import CVGPipeline
    from cvg.request import PipelineOptions

    if not smoke:
        _cuda()
    device = "cpu" if smoke else "cuda"
    pipe = tiny_wan_pipeline(seed=0, text_encoder_weights=False).to(device)
    size = dict(height=64, width=64, num_frames=9 if smoke else 17, num_inference_steps=4 if smoke else 20)
    names = {
        None: "eager diffusers forwards",
        "torch": "torch engine, guided step as a CUDA graph",
        "compiled": "compiled engine (reduce-overhead), guided step as a CUDA graph",
    }
    rows, videos = {}, {}
    for engine, row in names.items():
        cvg = CVGPipeline(pipe, options=PipelineOptions(step_backend=engine))

        def call(cvg=cvg):
            gen = torch.Generator(device).manual_seed(0)
            return cvg("a red cube to the left of a blue ball", "red cube left of blue ball", generator=gen, **size)

        built = time.perf_counter()
        videos[engine] = call().frames
        first = time.perf_counter() - built
        seconds, _ = _time(call, reps=2 if smoke else 5)
        rows[row] = {"first_call_s": first, "s_per_clip": seconds}
    import numpy as np

    eager = np.asarray(videos[None], dtype=np.float64)
    for engine in ("torch", "compiled"):
        rows[names[engine]]["max_pixel_change"] = float(
            np.abs(np.asarray(videos[engine], dtype=np.float64) - eager).max()
        )
    return {"size": size, "rows": rows}


# In run order, with each one's own timeout (seconds).
CHECKS = {
    "environment": (check_environment, 60),
    "cuda tests": (check_cuda_tests, 240),
    "attention_pool timing": (check_attention_pool_timing, 90),
    "real-width steps": (check_real_width_steps, 150),
    "tiny generation": (check_tiny_generation, 150),
}


# --- the bundle ----------------------------------------------------------------------------------------------


def prepare(bundle: Path) -> None:
    """Build cvg's wheel (pure Python: the optional native extension is left out) from a copy of its
    sources, so no build/ or egg-info is left in the checkout; download the diffusers wheel of the
    installed release; copy MiniLM's tokenizer and config (no weights)."""
    import shutil
    import tempfile
    from importlib.metadata import version

    from cvg.models.minilm import minilm_directory

    wheels = (bundle / "wheels").resolve()
    wheels.mkdir(parents=True, exist_ok=True)
    for stale in (p for name in WHEELS for p in wheels.glob(f"{name}-*.whl")):  # one version of each travels
        stale.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    with tempfile.TemporaryDirectory() as source:
        for name in ("setup.py", "pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source)
        for name in ("cvg", "kernels"):
            shutil.copytree(ROOT / name, Path(source) / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), source]
        subprocess.run(build, env={**os.environ, "CVG_NO_NATIVE": "1"}, check=True)
    subprocess.run([*pip, "download", "--no-deps", "-d", str(wheels), f"diffusers=={version('diffusers')}"], check=True)
    (bundle / "minilm").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_directory() / name, bundle / "minilm" / name)


def bundle_problems(bundle: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(what is missing or too large, [(file, bytes)]) of the bundle."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file()) if bundle.is_dir() else []
    listed = [(str(p.relative_to(bundle)), p.stat().st_size) for p in files]
    problems = [
        f"no {name} wheel in {bundle / 'wheels'}" for name in WHEELS if not list(bundle.glob(f"wheels/{name}-*.whl"))
    ]
    problems += [f"no {bundle / 'minilm' / n}" for n in TOKENIZER_FILES if not (bundle / "minilm" / n).is_file()]
    tree = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree_bytes = sum((ROOT / os.fsdecode(f)).stat().st_size for f in tree if f and (ROOT / os.fsdecode(f)).is_file())
    total = tree_bytes + sum(size for _, size in listed)
    if total > CARRY_LIMIT:
        problems.append(f"the working tree ({tree_bytes / MiB:.1f} MiB) and the bundle pass 64 MiB ({total / MiB:.1f})")
    if problems:
        problems.append(f"run: python benchmarks/gpu_check.py --prepare --bundle {bundle}")
    listed.append(("(working tree, tracked files)", tree_bytes))
    return problems, listed


def dry_run(bundle: Path) -> int:
    """The bundle is complete and under the limit, every check resolves, their code imports, and pytest
    collects the CUDA tests."""
    problems, listed = bundle_problems(bundle)
    for name, size in listed:
        print(f"bundle: {name} {size / MiB:.2f} MiB")
    imports = [
        "cvg.kernels.attention_pool",
        "cvg.kernels.attention_pool_backward",
        "cvg.runtime.guided_graph",
        "cvg.runtime.step_backend",
        "cvg.models.tiny",
        "cvg.pipeline",
        "triton.testing",
        "diffusers",
    ]
    code = "import importlib, sys; sys.path.insert(0, 'benchmarks'); import real_width; " + "; ".join(
        f"importlib.import_module({m!r})" for m in imports
    )
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        problems.append(f"imports failed: {proc.stderr.strip().splitlines()[-1:]}")
    argv = [sys.executable, "-P", "-m", "pytest", "-q", "--collect-only", "-m", "cuda", "-p", "no:cacheprovider"]
    proc = subprocess.run([*argv, *CUDA_TESTS], cwd=ROOT, capture_output=True, text=True)
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    print(f"checks: {', '.join(CHECKS)}; CUDA tests collected: {len(collected)}")
    if proc.returncode != 0 or not collected:
        problems.append(f"pytest could not collect the CUDA tests (exit {proc.returncode})")
    for problem in problems:
        print(f"gpu_check --dry-run: {problem}", file=sys.stderr)
    return 1 if problems else 0


# --- running -------------------------------------------------------------------------------------------------


def install(bundle: Path) -> dict[str, str]:
    """pip-install the bundle's wheels into SITE (no index, no dependencies); the children's environment."""
    wheels = sorted(str(p) for p in (bundle / "wheels").glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*pip, "--target", str(SITE), *wheels], check=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))}


def run_checks(out: Path, bundle: Path, env: dict[str, str], budget_s: float, smoke: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **env, "TRITON_INTERPRET": "0", "CVG_GPU_CHECK_TMP": str(out), "PYTHONUNBUFFERED": "1"}
    if not smoke:  # MiniLM's tokenizer from the bundle (its weights never travel)
        env.setdefault("CVG_MINILM_DIR", str(bundle.resolve() / "minilm"))
    deadline = time.monotonic() + budget_s
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": smoke, "checks": {}}
    for name, (_, timeout) in CHECKS.items():
        left = deadline - time.monotonic()
        if left < min(timeout, 30):
            report["checks"][name] = {"status": "skipped", "reason": f"out of the {budget_s:.0f} s budget"}
            continue
        result_file = out / f"{name.replace(' ', '_')}.json"
        argv = [sys.executable, "-P", __file__, "--child", name, "--result", str(result_file)] + (["--smoke"] * smoke)
        begin = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(timeout, left))
            entry = (
                json.loads(result_file.read_text())
                if result_file.exists()
                else {"status": "failed", "reason": f"crashed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"}
            )
        except subprocess.TimeoutExpired:
            entry = {"status": "timed out", "reason": f"past its {min(timeout, left):.0f} s"}
        result_file.unlink(missing_ok=True)
        entry["seconds"] = round(time.monotonic() - begin, 1)
        report["checks"][name] = entry
        print(f"{name}: {entry['status']} ({entry['seconds']} s) {entry.get('reason', '')[:500]}", flush=True)
    (out / "junit.xml").unlink(missing_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    failed = [n for n, e in report["checks"].items() if e["status"] == "failed"]
    failed += ["cuda tests"] if report["checks"]["cuda tests"]["status"] == "timed out" else []
    return 1 if failed else 0


def _child(name: str, result: Path, smoke: bool) -> None:
    function = CHECKS[name][0]
    try:
        entry = {"status": "passed", "results": function(smoke)}
    except Skipped as e:
        entry = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # reported, not raised: the next check still runs
        import traceback

        entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result.write_text(json.dumps(entry, indent=1))


def _cells(values: dict) -> str:
    return " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values.values())


def markdown(report: dict) -> str:
    """The report as text: one line per check, then each timing's rows as a table."""
    env = report["checks"].get("environment", {}).get("results", {})
    lines = [
        f"GPU check, {report['date']}: {env.get('gpu', 'no GPU')} ({env.get('capability', '-')}), "
        f"torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}), triton {env.get('triton')}, diffusers {env.get('diffusers')}"
        + (" (smoke run on CPU, tiny sizes: not GPU figures)" if report["smoke"] else ""),
        "",
        "| check | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, entry in report["checks"].items():
        note = entry.get("reason", "")
        if name == "cuda tests" and "results" in entry:
            note = ", ".join(f"{len(v)} {k}" for k, v in entry["results"].items())
        lines.append(
            f"| {name} | {entry['status']} | {entry.get('seconds', '-')} | {note.splitlines()[0] if note else ''} |"
        )
    for name, entry in report["checks"].items():
        rows = entry.get("results", {}).get("rows")
        if not rows:
            continue
        header = {k: v for k, v in entry["results"].items() if k != "rows"}
        lines += ["", f"{name}: {json.dumps(header)}"]
        columns = None
        for row, values in rows.items():
            if list(values) != columns:  # a new table where the columns change
                columns = list(values)
                lines += ["", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            lines.append(f"| {row} | {_cells(values)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=BUNDLE, help="the folder that travels (default .gpu)")
    parser.add_argument("--prepare", action="store_true", help="build the bundle here")
    parser.add_argument("--dry-run", action="store_true", help="check the bundle, the checks and their imports")
    parser.add_argument("--install", action="store_true", help="pip-install the bundle's wheels first (GPU machine)")
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all checks together (default 480)")
    parser.add_argument("--smoke", action="store_true", help="run every check on the CPU at tiny sizes")
    parser.add_argument("--child", choices=list(CHECKS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.result, args.smoke)
    elif args.prepare:
        prepare(args.bundle)
        sys.exit(dry_run(args.bundle))
    elif args.dry_run:
        sys.exit(dry_run(args.bundle))
    elif args.out is None:
        parser.error("--out DIR is needed to run the checks")
    else:
        env = install(args.bundle) if args.install else {}
        sys.exit(run_checks(args.out, args.bundle, env, args.budget, args.smoke))


if __name__ == "__main__":
    main()
