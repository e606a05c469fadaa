"""Step engines for the gradient-free later steps (eager, compiled, ONNX, TensorRT) and the guided step
as one replayable graph. The sampler knows them only through `StepBackend`'s small interface.

This file stays light: callers catch `BackendError` without loading a backend."""

from cvg.request import STEP_BACKENDS  # declared with the options that name them

__all__ = ["STEP_BACKENDS", "BackendError"]


class BackendError(RuntimeError):
    """A backend that cannot be built or loaded here; the message says why in one line."""
