"""Compositions and what steers toward them: the grammar-free `Composition`, objectives over pooled maps,
the compositional classifier, the guided sampler step and Euler inversion."""
