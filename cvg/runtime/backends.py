"""The step backends, by name: what each runs, what it refuses, whether `auto` may pick it, and
`build_backend`, which builds one for a transformer at one shape.

To add a backend: a `StepBackend` subclass in a module of its own (its `_run` the forward; raise
`BackendError` in one line where it cannot build), an entry here, and its name in `cvg.request.STEP_BACKENDS`;
`tests/runtime/test_engine.py` runs every registered backend against the eager one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cvg.runtime import BackendError
from cvg.runtime.step_backend import CompiledBackend, EagerBackend, StepBackend, StepShape


def _onnxruntime() -> type[StepBackend]:
    from cvg.runtime.onnx_backend import OnnxRuntimeBackend  # loads onnx and onnxruntime only when asked for

    return OnnxRuntimeBackend


def _tensorrt() -> type[StepBackend]:
    from cvg.runtime.tensorrt_backend import TensorRTBackend

    return TensorRTBackend


def _cuda_only(transformer: torch.nn.Module) -> str | None:
    return None if transformer.device.type == "cuda" else "needs the model on a CUDA device"


@dataclass(frozen=True)
class Backend:
    """One way to run the later steps. `refusal(transformer)` is None where it may be tried, else why not
    (more reasons surface as a `BackendError` while it builds)."""

    name: str
    runs: str  # what it runs, in a phrase
    load: Callable[[], type[StepBackend]]  # its class, imported on demand
    refusal: Callable[[torch.nn.Module], str | None]
    automatic: bool  # whether `auto` may pick it


# In `auto`'s order: the first automatic backend that is not refused and builds runs; eager always does.
REGISTRY = {
    "tensorrt": Backend("tensorrt", "a TensorRT plan of the ONNX export (CUDA)", _tensorrt, _cuda_only, True),
    "onnxruntime": Backend(
        "onnxruntime",
        "the ONNX export on ONNX Runtime (TensorRT, CUDA or CPU providers)",
        _onnxruntime,
        lambda transformer: None,
        True,
    ),
    "torch": Backend("torch", "diffusers' forward, eager: the reference", lambda: EagerBackend, lambda t: None, True),
    "compiled": Backend(
        "compiled", "torch.compile (inductor), weights frozen on CPU", lambda: CompiledBackend, lambda t: None, False
    ),
}


def build_backend(
    transformer: torch.nn.Module, shape: StepShape, backend: str = "auto", cache_dir: str | Path | None = None
) -> StepBackend:
    """A step backend for `shape`; `auto` takes the first automatic one that builds here (each one that
    cannot says why in a warning)."""
    if backend not in (*REGISTRY, "auto"):
        raise ValueError(f"backend must be one of {', '.join(REGISTRY)} or auto, got {backend!r}")
    cache = Path(cache_dir) if cache_dir else None
    if backend != "auto":
        entry = REGISTRY[backend]
        if (reason := entry.refusal(transformer)) is not None:
            raise BackendError(f"{backend} backend: {reason}")
        return entry.load()(transformer, shape, cache)
    for entry in (e for e in REGISTRY.values() if e.automatic and e.refusal(transformer) is None):
        try:
            return entry.load()(transformer, shape, cache)
        except BackendError as e:
            warnings.warn(f"cvg: {e}; trying the next backend", RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable: the torch backend always builds")
