"""The tensorrt step engine: a native TensorRT plan built from the ONNX export (fp16/bf16, timing cache),
cached beside it. Needs `tensorrt` (pip install cvg[tensorrt]) and CUDA: never run on the machines cvg
is developed on, so it follows TensorRT 10's documented Python API and stays thin."""

from __future__ import annotations

from pathlib import Path

import torch

from cvg.io.files import atomic_path, record_digest, verified
from cvg.runtime import BackendError
from cvg.runtime.onnx_backend import export_onnx
from cvg.runtime.step_backend import FORWARD_INPUTS, StepBackend, StepShape


class TensorRTBackend(StepBackend):
    """A TensorRT plan built from the ONNX export (TensorRT 10 API), cached beside it. CUDA only."""

    backend = "tensorrt"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        super().__init__(transformer, shape)
        if transformer.device.type != "cuda":
            raise BackendError("tensorrt backend: needs the model on a CUDA device")
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError(
                "tensorrt backend: the tensorrt package is not installed (pip install cvg[tensorrt])"
            ) from None
        self.trt = trt
        onnx_path = export_onnx(transformer, shape, cache_dir)
        plan_path = onnx_path.with_suffix(".plan")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        # A plan is deserialised as code: only the bytes this process family wrote (their digest) are trusted.
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes()) if verified(plan_path) else None
        if engine is None:  # no plan yet, or a stale/corrupt one (deserialisation returns None)
            plan = self._build(onnx_path, logger)
            with atomic_path(plan_path) as tmp:
                tmp.write_bytes(plan)
            record_digest(plan_path)
            engine = runtime.deserialize_cuda_engine(plan)
        self.engine, self.context = engine, engine.create_execution_context()
        with torch.no_grad():
            self._run(*self._example())

    def _build(self, onnx_path: Path, logger) -> bytes:
        trt = self.trt
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"tensorrt backend: cannot parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        if self.shape.dtype in ("float16", "bfloat16"):
            config.set_flag(trt.BuilderFlag.FP16 if self.shape.dtype == "float16" else trt.BuilderFlag.BF16)
        timing_path = onnx_path.parent / "tensorrt.timing-cache"
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"tensorrt backend: building a plan from {onnx_path.name} failed")
        with atomic_path(timing_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        return bytes(plan)

    def _run(self, latents, timestep, text, key_bias):
        out = torch.empty(self.shape.latent_shape, device=latents.device, dtype=latents.dtype)
        tensors = {
            **dict(zip(FORWARD_INPUTS, (latents.contiguous(), timestep, text, key_bias), strict=True)),
            "noise": out,
        }
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise BackendError("tensorrt backend: execution failed")
        return out
