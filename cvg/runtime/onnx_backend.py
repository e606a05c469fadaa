"""The onnxruntime step engine: the transformer exported to ONNX once per (model, shape, dtype, opset),
cached on disk with its SHA-256 recorded, run by ONNX Runtime with torch tensors bound as inputs and
output (no host copies)."""

from __future__ import annotations

import contextlib
import glob
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from cvg.io.files import atomic_path, locked, record_digest, remove_stale_temporaries, verified
from cvg.models.wan import model_key
from cvg.runtime import BackendError
from cvg.runtime.step_backend import FORWARD_INPUTS, StepBackend, StepShape, default_cache_dir

OPSET = 18


def export_onnx(transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None) -> Path:
    """The transformer's ONNX file for `shape`, exported (atomically) if the cache lacks a valid one."""
    cache_dir = Path(cache_dir or default_cache_dir())
    path = cache_dir / f"{type(transformer).__name__}-{model_key(transformer)}-{shape.key()}-opset{OPSET}.onnx"
    if verified(path):
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with locked(path.with_name(path.name + ".lock")):  # one exporter per file; the others wait, then reuse
        if verified(path):
            return path
        if path.is_file():  # torn, or changed in place (flipped weight bytes pass onnx's checker): rebuild
            warnings.warn(
                f"cvg: cached ONNX file {path.name} is invalid (its content is not the one exported); re-exporting",
                RuntimeWarning,
                stacklevel=2,
            )
            path.unlink()
        remove_stale_temporaries(path.parent, glob.escape(path.name))  # killed exporters': model-sized files
        _export(transformer, shape, path)
    return path


def _export(transformer: torch.nn.Module, shape: StepShape, path: Path) -> None:
    import onnx

    engine = StepBackend(transformer, shape)
    with (
        atomic_path(path) as tmp,
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        engine.forward.biased(),
    ):
        warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notes
        torch.onnx.export(
            engine.forward,
            engine._example(),
            str(tmp),
            input_names=list(FORWARD_INPUTS),
            output_names=["noise"],
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
            external_data=False,
        )
        onnx.checker.check_model(str(tmp), full_check=False)
    record_digest(path)


class OnnxRuntimeBackend(StepBackend):
    """ONNX Runtime on the cached ONNX export, with torch tensors bound as inputs and output."""

    backend = "onnxruntime"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        super().__init__(transformer, shape)
        try:
            import onnx  # noqa: F401  (the export needs it)
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"onnxruntime backend: {e.name} is not installed (pip install cvg[onnx])") from None
        if shape.torch_dtype not in _NUMPY:
            raise BackendError(f"onnxruntime backend: no {shape.dtype} input binding; use float32 or float16")
        self.ort, self.device = ort, transformer.device
        wanted = ("TensorrtExecutionProvider", "CUDAExecutionProvider") if self.device.type == "cuda" else ()
        self.providers = [p for p in (*wanted, "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.path = export_onnx(transformer, shape, cache_dir)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=self.providers)
        except Exception as e:  # valid ONNX that this runtime rejects: rebuild once, then give up
            self.path.unlink(missing_ok=True)
            self.path = export_onnx(transformer, shape, cache_dir)
            try:
                self.session = ort.InferenceSession(str(self.path), providers=self.providers)
            except Exception:
                raise BackendError(f"onnxruntime backend: cannot load {self.path.name}: {e}") from e
        with torch.no_grad():
            self._run(*self._example())  # warm-up: the session's first run allocates

    def _run(self, latents, timestep, text, key_bias):
        out = torch.empty(self.shape.latent_shape, device=latents.device, dtype=latents.dtype)
        binding = self.session.io_binding()
        bound = {
            **dict(zip(FORWARD_INPUTS, (latents.contiguous(), timestep, text, key_bias), strict=True)),
            "noise": out,
        }
        for name, tensor in bound.items():  # `bound` keeps the memory alive through the run
            bind = binding.bind_output if name == "noise" else binding.bind_input
            bind(
                name,
                tensor.device.type,
                tensor.device.index or 0,
                _NUMPY[tensor.dtype],
                tuple(tensor.shape),
                tensor.data_ptr(),
            )
        self.session.run_with_iobinding(binding)
        return out


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}
