"""attention_pool as PyTorch sees it: registered custom ops (opcheck), one op under torch.compile and
torch.export, forward and backward, with no graph break."""

from dataclasses import replace

import pytest
import torch
from reference import make_problem
from tolerance import ulps

from cvg import attention_pool, grid_groups
from cvg.ops.attention_pool_torch import attention_pool_cpu
from cvg.ops.pooling import make_pool_spec


def _op_args(p, keep_heads=False, masked_bias=True):
    spec = make_pool_spec(p.groups, p.tokens, p.num_groups, p.q.shape[1], keep_heads)
    bias = None
    if masked_bias:
        wide = torch.promote_types(p.q.dtype, torch.float32)  # as attention_pool_with_spec makes it
        bias = torch.zeros(p.q.shape[0], p.k.shape[2], dtype=wide).masked_fill(p.mask, float("-inf"))
        bias = bias[:, None, None, :]
    args = (p.q, p.k, p.v, bias, spec.groups, spec.tokens, spec.query_weight)
    return (*args, spec.num_groups, keep_heads, p.q.shape[-1] ** -0.5)


@pytest.mark.parametrize("keep_heads", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_passes_opcheck(keep_heads, dtype):
    """Schema, fake shapes (against the real outputs), autograd registration and dispatch all agree."""
    p = make_problem(B=2, H=2, N=24, M=9, D=8, T=3, G=5, masked=True, keep_heads=keep_heads, seed=1)
    q, k, v = (t.to(dtype).requires_grad_() for t in (p.q, p.k, p.v))
    args = _op_args(replace(p, q=q, k=k, v=v), keep_heads)
    torch.library.opcheck(attention_pool_cpu, args)


def _pooled_loss(q, k, v, groups, tokens, num_groups):
    out, pooled = attention_pool(q, k, v, groups, tokens, num_groups=num_groups, backend="torch")
    return out.square().mean() + pooled.log().mean()


def test_compiled_with_fullgraph_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    groups, (tf, th, tw) = grid_groups(2, 4, 4, pool=(1, 2, 2))
    tokens = torch.tensor([1, 3, 4])
    inputs = [
        torch.randn(2, 2, 32, 8, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3)
    ]
    k, v = inputs[1][:, :, :11].detach().requires_grad_(), inputs[2][:, :, :11].detach().requires_grad_()
    q = inputs[0]
    counts = torch._dynamo.utils.counters
    counts.clear()
    # aot_eager: Dynamo's capture (where graph breaks happen) and AOT autograd's forward and backward graphs,
    # without Inductor's C++ codegen (40 s here); cvg.bench measures compiled engines.
    compiled = torch.compile(_pooled_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, groups, tokens, tf * th * tw)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = _pooled_loss(q, k, v, groups, tokens, tf * th * tw)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    assert not counts["graph_break"]
    # The same kernels (aot_eager runs the traced graph without codegen): equal up to float32 reordering.
    torch.testing.assert_close(loss, ref, rtol=0, atol=ulps(ref))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ulps(want))


def test_traced_graph_holds_the_op_not_its_insides():
    groups, (tf, th, tw) = grid_groups(1, 4, 4, pool=2)
    tokens = torch.tensor([0, 2])
    q, k, v = (torch.randn(1, 2, n, 8) for n in (16, 5, 5))

    class Pool(torch.nn.Module):
        def forward(self, q, k, v):
            return attention_pool(q, k, v, groups, tokens, num_groups=tf * th * tw, backend="torch")

    exported = torch.export.export(Pool(), (q, k, v))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "cvg.attention_pool_cpu.default" in targets
    assert not any("flash_attention" in t for t in targets)  # the kernel call stays inside the op
    torch.testing.assert_close(exported.module()(q, k, v), Pool()(q, k, v), rtol=0, atol=0)


def test_compiled_call_needs_num_groups():
    groups, _ = grid_groups(1, 4, 4, pool=2)
    q, k, v = (torch.randn(1, 2, n, 8) for n in (16, 5, 5))
    fn = torch.compile(
        lambda q, k, v: attention_pool(q, k, v, groups, [0], backend="torch"), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(Exception, match="num_groups"):
        fn(q, k, v)
