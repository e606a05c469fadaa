"""The settings of a generation are declared once (`cvg.request`): every door (the CLI's flags, the HTTP
schema, the Python signatures, the C++ `EngineOptions`) takes its names, defaults, help and bounds from the
declaration, and refuses what it refuses."""

import inspect
import re
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from cvg.cli import build_parser
from cvg.guidance.config import GuidanceConfig
from cvg.request import REQUEST_FIELDS, GenerationRequest, PipelineOptions, ServerOptions, declared

ROOT = Path(__file__).resolve().parents[1]
DECLARED = {
    **declared(ServerOptions),
    **declared(GuidanceConfig),
    **declared(PipelineOptions),
    **declared(GenerationRequest),
}  # a request overrides
# What belongs to one door only: where its output goes and how it is shown, the server's own settings.
GENERATE_ONLY = {"help", "model", "objective", "out", "save_maps", "fps", "quiet", "judge", "compare_seeds"}
GENERATE_ONLY |= {"contact_sheet", "command", "run"}
SERVE_ONLY = {"help", "model", "command", "run"}  # the rest of its flags: ServerOptions
# A door's own defaults, where it differs from the declaration's (each says why where it is set).
SERVE_DEFAULTS = {"num_inference_steps": 20, "step_backend": "auto"}


def _actions(command: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions}


@pytest.mark.parametrize(
    ("command", "own", "defaults"), [("generate", GENERATE_ONLY, {}), ("serve", SERVE_ONLY, SERVE_DEFAULTS)]
)
def test_every_flag_is_a_declared_field_with_its_default_and_help(command, own, defaults):
    actions = _actions(command)
    assert set(actions) - own - set(DECLARED) == set()
    for name, action in actions.items():
        if name in own:
            continue
        spec = DECLARED[name]
        expected = defaults.get(name, None if spec["default"] is MISSING else spec["default"])
        assert action.default == expected, name
        if name != "transformer_dtype":  # its help adds what --dtype auto means on this machine
            assert action.help.startswith(spec["help"]), name


def test_the_http_schema_is_the_declaration_with_the_servers_limits():
    from cvg.serving.runner import SERVED_FIELDS, SERVER_LIMITS
    from cvg.serving.videos import VideoRequest

    schema = VideoRequest.model_json_schema()["properties"]
    openai_spellings = {"model", "size", "seconds"}  # OpenAI's names, made into declared fields (`job_request`)
    assert set(schema) == {*SERVED_FIELDS, "maps", "fps", *openai_spellings} and set(SERVED_FIELDS) <= REQUEST_FIELDS
    assert set(SERVER_LIMITS) <= set(SERVED_FIELDS)
    for name in SERVED_FIELDS:
        assert schema[name]["description"] == DECLARED[name]["help"], name
    steps = next(s for s in schema["num_inference_steps"]["anyOf"] if s.get("type") == "integer")
    assert (steps["minimum"], steps["maximum"]) == (1, 200)  # declared low, the server's high
    iterations = next(s for s in schema["iterations"]["anyOf"] if s.get("type") == "integer")
    assert (iterations["minimum"], iterations["maximum"]) == (1, 100)  # both declared


def test_the_python_signatures_take_the_declared_names_and_defaults():
    from cvg.pipeline import CVGPipeline
    from cvg.serving.service import Engine

    call = inspect.signature(CVGPipeline.__call__).parameters
    python_only = {"self", "generator", "latents", "output_type", "on_step"}
    assert set(call) - python_only == REQUEST_FIELDS - {"seed"}  # the seed is the generator's
    for name in REQUEST_FIELDS - {"seed", "prompt"}:
        assert call[name].default == DECLARED[name]["default"], name
    engine = inspect.signature(Engine.__init__).parameters
    assert set(engine) == {"self", "model", "height", "width", "num_frames", "options", "guidance", "threads"} | {
        "max_composition_tokens",
        "settings",
    }
    loading = inspect.signature(CVGPipeline.from_pretrained).parameters
    assert {"options", "guidance"} <= set(loading)


def test_the_cpp_options_are_declared_fields():
    from cvg.serving.cpp_api import CPP_GUIDANCE, CPP_OPTIONS, CPP_SETTINGS

    header = (ROOT / "csrc" / "include" / "cvg" / "cvg.hpp").read_text()
    body = re.search(r"struct EngineOptions \{(.*?)\n\};", header, re.S).group(1)
    names = set(re.findall(r"^\s+(?:int|float|std::string) (\w+)", body, re.M))
    assert names == {*CPP_SETTINGS, *CPP_OPTIONS, *CPP_GUIDANCE, "python"}
    assert set(CPP_SETTINGS.values()) <= REQUEST_FIELDS
    assert set(CPP_OPTIONS.values()) <= {f.name for f in fields(PipelineOptions)}
    assert set(CPP_GUIDANCE.values()) <= {f.name for f in fields(GuidanceConfig)}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"iterations": 101}, "iterations must be between 1 and 100, got 101"),
        ({"num_inference_steps": True}, "num_inference_steps must be an integer"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be finite"),
        ({"seed": -1}, "seed must be between 0 and"),
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"prompt": []}, "prompt must be a non-empty string"),
        ({"negative_prompt": 3}, "negative_prompt must be a string"),
    ],
)
def test_a_request_is_checked_by_field(given, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**{"prompt": "a red cube", **given}).check()


def test_every_door_refuses_what_the_declaration_refuses(tiny_pipe):
    """iterations above its bound: the CLI before loading anything, the HTTP schema, the Python call."""
    from pydantic import ValidationError

    from cvg.pipeline import CVGPipeline
    from cvg.serving.videos import VideoRequest

    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["generate", "--model", "m", "--prompt", "p", "--out", "o.mp4", "--iterations", "101"]
        )
    with pytest.raises(ValidationError, match="iterations"):
        VideoRequest(prompt="p", iterations=101)
    with pytest.raises(ValueError, match="iterations must be between 1 and 100"):
        CVGPipeline(tiny_pipe)("a red cube", "red cube left of blue ball", iterations=101, num_inference_steps=2)


def test_options_are_checked_and_old_names_still_work_with_a_warning(tiny_pipe):
    from cvg.pipeline import CVGPipeline

    with pytest.raises(ValueError, match="choose one step cache"):
        PipelineOptions(first_block_cache=0.1, taylorseer_cache=2).check()
    with pytest.raises(ValueError, match="transformer_dtype must be one of"):
        PipelineOptions(transformer_dtype="int8").check()
    with pytest.warns(DeprecationWarning, match=r"CVGPipeline\(engine=...\) is deprecated"):
        pipe = CVGPipeline(tiny_pipe, engine="torch", batch_cfg=True)
    assert (pipe.options.step_backend, pipe.options.batch_cfg) == ("torch", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CVGPipeline(tiny_pipe, options=PipelineOptions(step_backend="eager")).options.step_backend is None
    with pytest.raises(TypeError, match="unexpected keyword arguments: engines"):
        CVGPipeline(tiny_pipe, engines="torch")
