"""Serving: `Engine` (a loaded pipeline answering requests from any thread) and the C++ bridge
(`cpp_api`, used by csrc/engine.cpp)."""

from cvg.serving.service import Engine

__all__ = ["Engine"]
