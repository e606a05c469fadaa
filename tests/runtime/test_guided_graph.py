"""Guided steps over static tensors: the same update as the sampler's, and nothing that stops CUDA-graph
capture (no host synchronisation, no tensor made from host data) in the step itself."""

import pytest
import torch
from tolerance import ulps
from torch.utils._python_dispatch import TorchDispatchMode

from cvg.guidance.classifier import ClassifierConfig, ClassifierObjective, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import MotionDirection, SpatialRelation, TokenPresence
from cvg.guidance.sampler import Denoiser, latent_update
from cvg.pipeline import CVGPipeline
from cvg.request import PipelineOptions
from cvg.runtime.guided_graph import GuidedStepGraph

PROMPTS = {
    "spatial": ("a red cube to the left of a blue ball", "red cube left of blue ball"),
    "motion": ("a blue ball moves right", "blue ball moves right"),
    "presence": ("a red cube and a blue ball", "red cube and blue ball"),
}
LATENTS = (2, 16, 3, 8, 8)  # 9 frames of 64x64


def _classifier():
    torch.manual_seed(0)
    classifier = CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 2, 2), label_dim=8))
    label = torch.randn(1, 8)
    return ClassifierObjective(classifier, encoder=lambda labels: label.expand(len(labels), -1))


OBJECTIVES = {
    "spatial": SpatialRelation(),
    "motion": MotionDirection(),
    "presence": TokenPresence(),
    "classifier": _classifier(),
}


def _request(pipe, kind, prompt=None, seed=0):
    text, composition = PROMPTS[kind]
    prompt = prompt or text
    embeds, _ = pipe.encode_prompt([prompt] * 2, do_classifier_free_guidance=False, max_sequence_length=128)
    bound = CVGPipeline(pipe).bind([prompt] * 2, composition, 128)
    latents = torch.randn(LATENTS, generator=torch.Generator().manual_seed(seed))
    return Denoiser(pipe.transformer, embeds, None, 1.0), bound, latents


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_graph_step_is_the_latent_update(tiny_pipe, name):
    kind = "spatial" if name == "classifier" else name
    objective, config = OBJECTIVES[name], GuidanceConfig(strength=0.3)
    denoiser, bound, latents = _request(tiny_pipe, kind)
    t = torch.tensor(900.0)
    graph = GuidedStepGraph(denoiser, objective, bound, config, latents, t)
    for seed, timestep in ((1, 900.0), (2, 700.0)):  # static buffers refilled, not stale
        x, t = torch.randn(LATENTS, generator=torch.Generator().manual_seed(seed)), torch.tensor(timestep)
        got = graph(x, t)
        want = latent_update(denoiser, x, t, objective, bound, config)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # text rows differ (64 vs as few as fit)
        assert not torch.equal(got[0], x)


def test_load_refills_another_requests_text(tiny_pipe):
    objective, config = SpatialRelation(), GuidanceConfig(strength=0.3)
    first, bound, latents = _request(tiny_pipe, "spatial")
    second, other_bound, _ = _request(tiny_pipe, "spatial", "a red cube to the left of a blue ball, on grass")
    graph = GuidedStepGraph(first, objective, bound, config, latents, torch.tensor(900.0))
    assert other_bound.tokens.tolist() == bound.tokens.tolist()  # same key: the graph serves both
    graph.load(second)
    got = graph(latents, torch.tensor(900.0))
    want = latent_update(second, latents, torch.tensor(900.0), objective, bound, config)
    # The graph and the eager call sum in different orders: allow 64 float32 ulps of the latents' scale,
    # far below what another request's text changes (checked next).
    tolerance = ulps(latents)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=tolerance)
    other = latent_update(first, latents, torch.tensor(900.0), objective, bound, config)[0]
    assert (got[0] - other).abs().max() > 100 * tolerance


class _HostTraffic(TorchDispatchMode):
    """Fails on what CUDA-graph capture forbids: reading tensor data on the host (item, bool, nonzero, data-
    dependent shapes) and making tensors from host data (Python lists, numpy), which copy host to device."""

    FORBIDDEN = {"_local_scalar_dense", "nonzero", "lift_fresh", "masked_select", "unique", "_unique2", "bincount"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN:
            raise AssertionError(f"the guided step calls aten.{name}, which CUDA-graph capture cannot take")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_the_step_is_capturable(tiny_pipe, name):
    kind = "spatial" if name == "classifier" else name
    denoiser, bound, latents = _request(tiny_pipe, kind)
    graph = GuidedStepGraph(denoiser, OBJECTIVES[name], bound, GuidanceConfig(), latents, torch.tensor(900.0))
    graph(latents, torch.tensor(900.0))  # lazy state is made on the first call (warm-up, on CUDA)
    with _HostTraffic():
        graph._step()
    with pytest.raises(AssertionError, match="aten._local_scalar_dense"), _HostTraffic():
        latents.sum().item()  # the check sees what it must


def test_pipeline_keeps_one_graph_per_composition(tiny_pipe, tmp_path):
    cvg = CVGPipeline(tiny_pipe, options=PipelineOptions(step_backend="torch", backend_cache=tmp_path))
    call = dict(height=64, width=64, num_frames=9, num_inference_steps=3, max_sequence_length=64, output_type="latent")
    for prompt in ("a red cube to the left of a blue ball", "a red cube to the left of a blue ball, at dusk"):
        cvg(prompt, "red cube left of blue ball", generator=torch.Generator().manual_seed(0), **call)
    assert len(cvg.steps.graphs) == 1
    cvg("a blue ball moves right", "blue ball moves right", generator=torch.Generator().manual_seed(0), **call)
    assert len(cvg.steps.graphs) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU; cvg's CI has none")
def test_cuda_graph_replay_matches_eager():  # pragma: no cover - runs only where CUDA exists
    from cvg.models.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(seed=0, text_encoder_weights=False).to("cuda")  # MiniLM's weights stay off the GPU box
    denoiser, bound, latents = _request(pipe, "spatial")
    latents, t = latents.cuda(), torch.tensor(900.0, device="cuda")
    graph = GuidedStepGraph(denoiser, SpatialRelation(), bound, GuidanceConfig(), latents, t)
    assert graph.graph is not None
    for seed in (1, 2):
        x = torch.randn(LATENTS, generator=torch.Generator().manual_seed(seed)).cuda()
        got, want = graph(x, t), latent_update(denoiser, x, t, SpatialRelation(), bound, GuidanceConfig())
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
