"""cvg: inference-time compositional guidance for frozen text-to-video diffusion models."""

from cvg.attention_pool import BACKENDS, attention_pool
from cvg.pooling import grid_groups

__all__ = ["BACKENDS", "attention_pool", "grid_groups"]
__version__ = "0.1.0"
