"""The attention-pool op: pooled cross-attention maps without materialising the attention matrix.

`attention_pool` dispatches to a backend (naive reference, SDPA-based torch backend, the Triton kernels in
`cvg.kernels`); `pooling` builds the grid groups. Ops know nothing of diffusers, models or guidance."""
