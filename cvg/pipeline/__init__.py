"""`CVGPipeline`: a diffusers `WanPipeline` or `CogVideoXPipeline` with compositional guidance.

- `pipeline_cvg.py`: `CVGPipeline` and `CVGOutput`; `__call__` in phases (check, bind, encode, latents,
  denoise, decode).
- `steps.py`: `StepBuilder`, each expert's `Denoiser` built whole, with its step backend and guided graph.
- `text.py`: `PromptEncoder`, the family's text encoding, recent prompts kept.
- `checks.py`: `check_request`, what a model refuses of a request, found before any work.
"""

from cvg.pipeline.pipeline_cvg import CVGOutput, CVGPipeline

__all__ = ["CVGOutput", "CVGPipeline"]
