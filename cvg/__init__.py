"""cvg: inference-time compositional guidance for frozen text-to-video diffusion models."""

from cvg import threads

threads.prepare_environment()  # before torch loads libgomp (cvg.threads)

from cvg.attention_pool import BACKENDS, attention_pool  # noqa: E402
from cvg.pooling import grid_groups  # noqa: E402

threads.apply_thread_count()


def __getattr__(name: str):
    # The diffusers integration loads lazily: `import cvg` for the op alone stays light.
    if name == "CVGPipeline":
        from cvg.pipeline import CVGPipeline

        return CVGPipeline
    if name == "Composition":
        from cvg.composition import Composition

        return Composition
    raise AttributeError(f"module 'cvg' has no attribute {name!r}")


__all__ = ["BACKENDS", "CVGPipeline", "Composition", "attention_pool", "grid_groups"]
__version__ = "0.1.0"
