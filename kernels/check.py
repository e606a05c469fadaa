"""Compile every Triton kernel of cvg ahead of time for real GPUs, on a machine without one.

    python -m cvg.kernels.check [--head-dims 64 128] [--dtypes float16 bfloat16] [--archs 90 80] [--json F]

For each kernel, head dim, dtype and architecture, at the default launch config, `triton.compile` lowers
the kernel to PTX and ptxas to a cubin; `cuobjdump` (shipped in the triton wheel) reports registers,
spilled bytes (stack and local memory) and shared memory, and the SASS is searched for HGMMA
(Hopper warpgroup MMA). Exits 1 if a default config spills. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from cvg.kernels import attention_pool as ap
from cvg.kernels import attention_pool_backward as bwd
from cvg.kernels.attention_pool_common import KernelConfig, _next_pow2, default_configs, dot_precision
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from cvg.io.files import write_text_atomic

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
# Argument kinds by name: pointers get the 16-byte alignment the runtime sees for torch allocations.
_INT32_POINTERS = {"Tok", "Groups"}
_FLOAT32_POINTERS = {"Bias", "QWeight", "Lse", "Pooled", "DPooled", "Delta"}
_INPUT_POINTERS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"}
_FLOAT_SCALARS = {"qk_scale", "scale"}


@dataclass
class KernelReport:
    kernel: str
    arch: int
    head_dim: int
    dtype: str
    block_n: int
    block_m: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # stack frame + local memory per thread
    shared_bytes: int
    hgmma: bool


KERNELS = {
    "fwd": ap._attn_pool_fwd,
    "bwd_delta": bwd._attn_pool_bwd_delta,
    "bwd_dkdv": bwd._attn_pool_bwd_dkdv,
    "bwd_dq": bwd._attn_pool_bwd_dq,
}


def _source(fn, dtype: str, head_dim: int, cfg: KernelConfig, num_tokens: int, keep_heads: bool) -> ASTSource:
    elem = _TRITON_TYPES[dtype]
    constexprs = dict(
        D=head_dim,
        D_PAD=_next_pow2(head_dim),
        T=num_tokens,
        T_PAD=_next_pow2(num_tokens),
        KEEP_HEADS=keep_heads,
        HAS_MASK=True,
        DOT_PRECISION=dot_precision(getattr(torch, dtype)),
        BLOCK_N=cfg.block_n,
        BLOCK_M=cfg.block_m,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INPUT_POINTERS | _FLOAT32_POINTERS | _INT32_POINTERS:
            kind = elem if name in _INPUT_POINTERS else "i32" if name in _INT32_POINTERS else "fp32"
            signature[name] = f"*{kind}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):  # strides are multiples of D (a multiple of 16 for real models)
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int, int, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", path], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], check=True, capture_output=True, text=True).stdout

    def field(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", usage)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no {name} figure:\n{usage}")
        return int(match.group(1))

    return field("REG"), field("STACK") + field("LOCAL"), field("SHARED"), "HGMMA" in sass


def compile_kernel(
    name: str, arch: int, head_dim: int, dtype: str, num_tokens: int = 16, keep_heads: bool = False
) -> KernelReport:
    cfg = default_configs(_next_pow2(head_dim), getattr(torch, dtype))[name]
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options({"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    src = _source(KERNELS[name], dtype, head_dim, cfg, num_tokens, keep_heads)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    regs, spills, static_shared, hgmma = _resources(compiled.asm["cubin"])
    shared = static_shared + compiled.metadata.shared  # Triton's operand buffers are dynamic shared memory
    block_m = 0 if name == "bwd_delta" else cfg.block_m
    return KernelReport(
        name, arch, head_dim, dtype, cfg.block_n, block_m, cfg.num_warps, cfg.num_stages, regs, spills, shared, hgmma
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvg.kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--dtypes", nargs="+", default=["float16", "bfloat16", "float32"], choices=sorted(_TRITON_TYPES)
    )
    parser.add_argument("--archs", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--json", help="also write the reports as JSON to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; silences Triton 3.9's notice

    reports = [
        compile_kernel(name, arch, dim, dtype)
        for arch in args.archs
        for dim in args.head_dims
        for dtype in args.dtypes
        for name in KERNELS
    ]
    print("| kernel | sm | D | dtype | block | warps | stages | registers | spill bytes | shared bytes | HGMMA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        block = f"{r.block_n}x{r.block_m}" if r.block_m else str(r.block_n)
        print(
            f"| {r.kernel} | {r.arch} | {r.head_dim} | {r.dtype} | {block} | {r.num_warps} | {r.num_stages} | "
            f"{r.registers} | {r.spill_bytes} | {r.shared_bytes} | {'yes' if r.hgmma else 'no'} |"
        )
    if args.json:
        write_text_atomic(args.json, json.dumps([asdict(r) for r in reports], indent=1))
    spilled = [r for r in reports if r.spill_bytes]
    for r in spilled:
        print(
            f"error: {r.kernel} spills {r.spill_bytes} bytes at sm_{r.arch}, D={r.head_dim}, {r.dtype}", file=sys.stderr
        )
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
