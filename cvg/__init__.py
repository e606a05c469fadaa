"""cvg: inference-time compositional guidance for frozen text-to-video diffusion models.

This is the library a serving user installs. The package is in layers; each imports only those below it
(checked by import-linter, `.importlinter`):

    cli, bench          the command line and the benchmark driver
    serving             the serving engine, `cvg serve` and its C++ bridge
    pipeline            CVGPipeline: a diffusers WanPipeline with compositional guidance
    runtime             step engines for the later steps; the guided step as one graph
    guidance            compositions, objectives, the classifier, the guided sampler, inversion, judges
    models              what knows diffusers' model internals: Wan loading, processors, VAE decode
    ops                 the attention-pool op and its backends (Triton kernels in cvg.kernels)
    measure             machine lines, results sections, timings and peak memory in child processes
    io, threads, request files, videos, the native extension; how cvg shares the machine's cores; what a
                        generation asks for and how a pipeline runs (declared once, for every door)

The research harness (the CompShapes world and judge, the training of its generator and classifier, the
findings) is the separate package cvg-research in `research/`: it imports cvg, never the reverse, and adds
its commands to `cvg` and its judge to `cvg.guidance.judges` through entry points.

`import cvg` loads nothing heavy and changes nothing in the process's environment: the public names below
load on first use, and cvg's thread policy is applied by its entry points or by `cvg.threads.configure()`.
"""

_PUBLIC = {
    "attention_pool": "cvg.ops.attention_pool",
    "BACKENDS": "cvg.ops.attention_pool",
    "grid_groups": "cvg.ops.pooling",
    "Composition": "cvg.guidance.composition",
    "GuidanceConfig": "cvg.guidance.sampler",
    "CVGPipeline": "cvg.pipeline",
    "CVGOutput": "cvg.pipeline",
    "GenerationRequest": "cvg.request",
    "PipelineOptions": "cvg.request",
    "Engine": "cvg.serving",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cvg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"
