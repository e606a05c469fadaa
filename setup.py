"""cvg's build: the optional native extension and the package layout.

`kernels/` (the Triton kernels) installs as `cvg.kernels`, never as a top-level `kernels` module.
"""

import os

from setuptools import find_packages, setup

try:  # the optional native extension cvg._C (csrc/); cvg works without it (see cvg/io/native.py)
    if os.environ.get("CVG_NO_NATIVE") == "1":  # a pure-Python wheel (benchmarks/gpu_check.py --prepare)
        raise ImportError("CVG_NO_NATIVE=1")
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

# Metadata, dependencies and the `cvg` script are in pyproject.toml's [project] table; what stays here is
# what it cannot say: the optional extension and `kernels/` installed as `cvg.kernels`.
setup(
    # Every package under cvg/ (the research harness is the separate cvg-research, in research/).
    packages=[*find_packages(include=["cvg", "cvg.*"]), "cvg.kernels"],
    package_dir={"cvg": "cvg", "cvg.kernels": "kernels"},
    ext_modules=ext_modules,
)
