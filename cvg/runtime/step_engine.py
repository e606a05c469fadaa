"""Step engines: the gradient-free transformer forward of the later denoising steps, at one fixed shape.

    engine = build_engine(pipe.transformer, StepShape.of(latents, prompt_embeds), backend="auto")
    noise = engine(latents, timestep, prompt_embeds)   # what the transformer returns, as a torch tensor

Backends:
  torch        eager, the reference
  compiled     torch.compile (inductor; C++ on CPU), warmed up at build
  onnxruntime  the transformer exported to ONNX once per (model, shape, dtype, opset), cached on disk, run
               by ONNX Runtime with the providers TensorRT -> CUDA -> CPU that it has, inputs and output
               bound to torch memory (no host copies)
  tensorrt     a native TensorRT plan built from the same ONNX file (fp16/bf16, timing cache), cached on
               disk. Needs `tensorrt` (pip install cvg[tensorrt]) and CUDA: never run on the machines
               cvg is developed on, so this layer follows TensorRT 10's documented Python API and stays thin.
Every backend drops Wan's zero text padding first, exactly (`cvg.models.padding`): the text attention runs over
`text_keys` keys (a multiple of 64) with an additive key bias instead of 512 keys. Prompts whose text
does not fit get a clear error; a longer-prompt shape builds its own engine.
`auto` tries tensorrt (CUDA only), onnxruntime, then torch; a backend that cannot load says why in one
line (a warning) and the next one is tried. Cache keys hash the weights, so a changed model never reuses
a stale file; each cached file's SHA-256 is recorded beside it when written, and a file whose content no
longer matches (torn, or bytes changed in place) is rebuilt, never run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cvg.io.files import atomic_path, locked, record_digest, remove_stale_temporaries, verified
from cvg.models.padding import collapse_padding, padded_length
from cvg.models.processors import KeyBiasWanAttnProcessor, TextBias, text_key_bias
from cvg.models.wan import model_key
from cvg.runtime import EngineError

STEP_BACKENDS = ("torch", "compiled", "onnxruntime", "tensorrt")
OPSET = 18
_INPUTS = ("latents", "timestep", "text", "key_bias")  # of the exported graph, in `_Forward.forward`'s order


@dataclass(frozen=True)
class StepShape:
    """The one input shape an engine serves: latents [batch, channels, frames, height, width] (latent
    units) and text embeddings [batch, text_tokens, text_dim], of which the first `text_keys` rows are
    attended to (the rest must be Wan's zero padding)."""

    batch: int
    channels: int
    frames: int
    height: int
    width: int
    text_tokens: int
    text_dim: int
    dtype: str = "float32"
    text_keys: int = 0  # 0: all text_tokens

    @classmethod
    def of(cls, latents: torch.Tensor, *text_embeds: torch.Tensor) -> StepShape:
        """The shape of `latents` and text; text_keys fits every given text (conditional, negative, ...)."""
        if latents.dim() != 5 or any(t.dim() != 3 for t in text_embeds) or not text_embeds:
            raise ValueError(
                f"expected latents [B, C, F, H, W] and text [B, L, D], got {tuple(latents.shape)} "
                f"and {[tuple(t.shape) for t in text_embeds]}"
            )
        dtype = str(latents.dtype).removeprefix("torch.")
        keys = max(padded_length(t) for t in text_embeds)
        return cls(*latents.shape, *text_embeds[0].shape[1:], dtype=dtype, text_keys=keys)

    def check(self, latents: torch.Tensor, text_embeds: torch.Tensor) -> None:
        got = (tuple(latents.shape), tuple(text_embeds.shape), str(latents.dtype).removeprefix("torch."))
        if got != (self.latent_shape, self.text_shape, self.dtype) or text_embeds.dtype != latents.dtype:
            raise ValueError(
                f"this engine serves latents {self.latent_shape} and text {self.text_shape} in {self.dtype}; got "
                f"latents {got[0]} and text {got[1]} in {got[2]}"
            )

    @property
    def keys(self) -> int:
        return self.text_keys or self.text_tokens

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.frames, self.height, self.width)

    @property
    def text_shape(self) -> tuple[int, ...]:
        return (self.batch, self.text_tokens, self.text_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self) -> str:
        sizes = (*self.latent_shape, self.text_tokens, self.text_dim)
        return "x".join(map(str, sizes)) + f"k{self.keys}-{self.dtype}"


class _Forward(torch.nn.Module):
    """The transformer as a plain (latents, timestep, text, key bias) -> noise function, for export and
    compile. Call it inside `self.biased()`: its processors add the key bias to the text attention."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.state = TextBias()
        self.processors = [KeyBiasWanAttnProcessor(self.state) for _ in transformer.blocks]

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, key_bias: torch.Tensor
    ) -> torch.Tensor:
        self.state.key_bias = key_bias
        return self.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False
        )[0]

    @contextlib.contextmanager
    def biased(self):
        """The processors installed (the same objects every call: compiled code keeps its guards)."""
        try:
            with text_key_bias(self.transformer, self.processors):
                yield
        finally:
            self.state.key_bias = None  # hold no request's tensor between calls


class StepEngine:
    """Eager torch: the reference every other backend is tested against."""

    backend = "torch"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        self.transformer, self.shape = transformer, shape
        self.forward = _Forward(transformer).eval()
        self._texts: list[tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]] = []

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        self.shape.check(latents, text_embeds)
        text, key_bias = self._collapsed(text_embeds)
        # A fresh [B] tensor of stride 1 (an expanded scalar keeps stride 0, which compiled code guards on).
        timestep = torch.empty(self.shape.batch, device=latents.device).copy_(timestep.expand(self.shape.batch))
        return self._run(latents, timestep, text, key_bias)

    def _collapsed(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows and key bias of `text_embeds`, found once per text: the sampler passes the same
        conditional and negative tensors every step, and finding the padding reads the text on the host
        (a sync per forward on a GPU otherwise). A text changed in place is found again."""
        for source, version, collapsed in self._texts:
            if source is text_embeds and version == text_embeds._version:
                return collapsed
        try:
            text, key_bias = collapse_padding(text_embeds, self.shape.keys)
        except ValueError as e:
            raise ValueError(
                f"this engine attends to {self.shape.keys} text rows: {e} (a longer prompt needs an "
                "engine built for it)"
            ) from None
        collapsed = (text.contiguous(), key_bias.contiguous())
        self._texts = [(text_embeds, text_embeds._version, collapsed), *self._texts[:1]]  # conditional and negative
        return collapsed

    def _run(self, latents, timestep, text, key_bias) -> torch.Tensor:
        with self.forward.biased():
            return self.forward(latents, timestep, text, key_bias)

    def _example(self) -> tuple[torch.Tensor, ...]:
        """Inputs of `_run`: latents, timestep, the kept text rows and their key bias."""
        device, dtype = self.transformer.device, self.shape.torch_dtype
        text = torch.randn(self.shape.text_shape, device=device, dtype=dtype)
        text[:, self.shape.keys // 2 :] = 0  # padded, so the bias is not all zero
        text, key_bias = collapse_padding(text, self.shape.keys)
        return (
            torch.randn(self.shape.latent_shape, device=device, dtype=dtype),
            torch.full((self.shape.batch,), 500.0, device=device),
            text,
            key_bias,
        )


class CompiledEngine(StepEngine):
    """torch.compile with static shapes; compiled and warmed up here, not on the first request."""

    backend = "compiled"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        super().__init__(transformer, shape)
        mode = "reduce-overhead" if transformer.device.type == "cuda" else None  # CUDA graphs on GPU
        self.compiled = torch.compile(self.forward, dynamic=False, mode=mode)
        with torch.no_grad():
            self._run(*self._example())

    def _run(self, latents, timestep, text, key_bias):
        with self.forward.biased():
            return self.compiled(latents, timestep, text, key_bias).clone()  # CUDA-graph outputs are reused


def default_cache_dir() -> Path:
    return Path(os.environ.get("CVG_CACHE", Path.home() / ".cache" / "cvg")) / "engines"


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

    engine = StepEngine(transformer, shape)
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
            input_names=list(_INPUTS),
            output_names=["noise"],
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
            external_data=False,
        )
        onnx.checker.check_model(str(tmp), full_check=False)
    record_digest(path)


class OnnxRuntimeEngine(StepEngine):
    """ONNX Runtime on the cached ONNX export, with torch tensors bound as inputs and output."""

    backend = "onnxruntime"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        super().__init__(transformer, shape)
        try:
            import onnx  # noqa: F401  (the export needs it)
            import onnxruntime as ort
        except ImportError as e:
            raise EngineError(f"onnxruntime backend: {e.name} is not installed (pip install cvg[onnx])") from None
        if shape.torch_dtype not in _NUMPY:
            raise EngineError(f"onnxruntime backend: no {shape.dtype} input binding; use float32 or float16")
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
                raise EngineError(f"onnxruntime backend: cannot load {self.path.name}: {e}") from e
        with torch.no_grad():
            self._run(*self._example())  # warm-up: the session's first run allocates

    def _run(self, latents, timestep, text, key_bias):
        out = torch.empty(self.shape.latent_shape, device=latents.device, dtype=latents.dtype)
        binding = self.session.io_binding()
        bound = {**dict(zip(_INPUTS, (latents.contiguous(), timestep, text, key_bias), strict=True)), "noise": out}
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


class TensorRTEngine(StepEngine):
    """A TensorRT plan built from the ONNX export (TensorRT 10 API), cached beside it. CUDA only."""

    backend = "tensorrt"

    def __init__(self, transformer: torch.nn.Module, shape: StepShape, cache_dir: Path | None = None):
        super().__init__(transformer, shape)
        if transformer.device.type != "cuda":
            raise EngineError("tensorrt backend: needs the model on a CUDA device")
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError(
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
            raise EngineError(f"tensorrt backend: cannot parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        if self.shape.dtype in ("float16", "bfloat16"):
            config.set_flag(trt.BuilderFlag.FP16 if self.shape.dtype == "float16" else trt.BuilderFlag.BF16)
        timing_path = onnx_path.parent / "tensorrt.timing-cache"
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"tensorrt backend: building a plan from {onnx_path.name} failed")
        with atomic_path(timing_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        return bytes(plan)

    def _run(self, latents, timestep, text, key_bias):
        out = torch.empty(self.shape.latent_shape, device=latents.device, dtype=latents.dtype)
        tensors = {**dict(zip(_INPUTS, (latents.contiguous(), timestep, text, key_bias), strict=True)), "noise": out}
        for name, tensor in tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError("tensorrt backend: execution failed")
        return out


_CLASSES = {
    "torch": StepEngine,
    "compiled": CompiledEngine,
    "onnxruntime": OnnxRuntimeEngine,
    "tensorrt": TensorRTEngine,
}
_AUTO = ("tensorrt", "onnxruntime", "torch")


def build_engine(
    transformer: torch.nn.Module, shape: StepShape, backend: str = "auto", cache_dir: str | Path | None = None
) -> StepEngine:
    """An engine for `shape`; `auto` takes the first of tensorrt, onnxruntime, torch that loads here."""
    if backend not in (*STEP_BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {', '.join(STEP_BACKENDS)} or auto, got {backend!r}")
    if backend != "auto":
        return _CLASSES[backend](transformer, shape, Path(cache_dir) if cache_dir else None)
    for name in _AUTO:
        if name == "tensorrt" and transformer.device.type != "cuda":
            continue
        try:
            return build_engine(transformer, shape, name, cache_dir)
        except EngineError as e:
            warnings.warn(f"cvg: {e}; trying the next backend", RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable: the torch backend always builds")
