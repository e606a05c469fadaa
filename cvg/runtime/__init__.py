"""Step engines for the gradient-free later steps (eager, compiled, ONNX, TensorRT) and the guided step
as one replayable graph. The sampler knows them only through `StepEngine`'s small interface.

This file stays light: callers catch `EngineError` without loading a backend."""

from cvg.request import STEP_BACKENDS  # declared with the options that name them

__all__ = ["STEP_BACKENDS", "EngineError"]


class EngineError(RuntimeError):
    """A backend that cannot be built or loaded here; the message says why in one line."""
