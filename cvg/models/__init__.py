"""What knows diffusers and model internals: Wan loading and manifests, attention processors, the text
padding collapse, the CPU VAE decode, the MiniLM text encoder and the tiny test generators. Models know
nothing of classifiers or guidance objectives."""

from cvg.request import PRECISIONS  # the precisions a transformer may be loaded in, by torch name

__all__ = ["PRECISIONS"]
