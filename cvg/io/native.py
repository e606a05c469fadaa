"""cvg's optional native extension `cvg._C` (csrc/pack_frames.cpp): `native` is the module, or None with
`MISSING` saying why. Everything it does has a numpy path; `pip install` builds it when a C++ compiler
and pybind11 are present and goes on without it otherwise."""

from __future__ import annotations

try:
    import cvg._C as native

    MISSING = None
except ImportError as error:  # built without a compiler, or a source checkout not installed
    native = None
    MISSING = f"cvg._C is not built ({error}); cvg uses its numpy paths. Reinstall cvg with a C++ compiler to build it."
