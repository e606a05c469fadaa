"""Triton kernels of cvg, installed as `cvg.kernels`."""
