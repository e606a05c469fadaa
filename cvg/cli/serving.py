"""`cvg serve`: video jobs over HTTP (`cvg.serving.api`) on a loaded model."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from cvg.cli.arguments import config_flags, config_from, given_fields
from cvg.cli.generation import OPTION_FLAGS, SETTING_FLAGS, SIZE_FLAGS, precision
from cvg.request import SERVED_STEPS, GenerationRequest, PipelineOptions, ServerOptions

TOKEN_VARIABLE = "CVG_SERVE_TOKEN"
SERVER_FLAGS = {f: {} for f in ServerOptions.__dataclass_fields__} | {
    "token_file": {"metavar": "FILE"},
    "out_dir": {"metavar": "DIR"},
    "served_model_name": {"metavar": "NAME"},
    "max_connections": {"metavar": "N"},
    "ray_replicas": {"metavar": "N"},
}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve video jobs over HTTP (POST /v1/videos, poll, fetch, DELETE to cancel)",
        description="Serve a local diffusers pipeline as asynchronous video jobs in OpenAI's video shape (the "
        "openai client's videos.create / retrieve / list / download_content / delete work against it): POST "
        "/v1/videos (JSON or a form), POST /v1/videos/sync, GET /v1/videos[/{id}[/content]], DELETE "
        "/v1/videos/{id}, GET /v1/models, /healthz, /metrics; the OpenAPI spec at /openapi.json.",
    )
    serve.add_argument("--model", required=True, help="local diffusers pipeline directory")
    config_flags(serve, ServerOptions, SERVER_FLAGS)
    config_flags(
        serve, PipelineOptions, OPTION_FLAGS | {"step_backend": {**OPTION_FLAGS["step_backend"], "default": "auto"}}
    )
    steps = {**SETTING_FLAGS["num_inference_steps"], "default": SERVED_STEPS}
    config_flags(serve, GenerationRequest, SIZE_FLAGS | SETTING_FLAGS | {"num_inference_steps": steps})
    serve.set_defaults(run=serve_jobs)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's, else --token's (with a warning), else $CVG_SERVE_TOKEN's, else none."""
    if args.token is not None:
        print(
            f"cvg serve: warning: --token is readable by any local user in the process list; use --token-file "
            f"or ${TOKEN_VARIABLE}",
            file=sys.stderr,
        )
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--token-file {args.token_file}: cannot read it ({type(e).__name__})") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
        return token
    return args.token or os.environ.get(TOKEN_VARIABLE) or None


def serve_jobs(args: argparse.Namespace) -> None:
    token = _token(args)
    directory = args.out_dir or tempfile.mkdtemp(prefix="cvg-serve-")
    options = config_from(args, PipelineOptions, OPTION_FLAGS)
    engine_options = {"options": replace(options, transformer_dtype=precision(options.transformer_dtype))}
    engine_options |= given_fields(args, SIZE_FLAGS | SETTING_FLAGS)  # every job's settings, unless it sets them
    queue_options = {
        "max_queued": args.queue_size,
        "keep_seconds": args.keep_seconds,
        "max_batch": args.max_batch,
        "batch_window": args.batch_window,
        "max_cost_ratio": args.max_job_cost,
        "job_timeout": args.job_timeout,
    }
    api_options = {"token": token, "model_name": args.served_model_name or Path(args.model).resolve().name}
    print(f"cvg serve: {args.model} on http://{args.host}:{args.port}, outputs in {directory}", flush=True)
    if args.ray_replicas:
        _serve_on_ray(args, directory, api_options, engine_options, queue_options)
    else:
        _serve_here(args, directory, api_options, engine_options, queue_options)


def _serve_here(args, directory: str, api_options: dict, engine_options: dict, queue_options: dict) -> None:
    import uvicorn

    from cvg.serving.api import create_app
    from cvg.serving.http import guarded_protocol
    from cvg.serving.jobs import JobQueue
    from cvg.serving.runner import EngineRunner
    from cvg.serving.service import Engine

    jobs = JobQueue(EngineRunner(Engine(args.model, **engine_options)), directory, **queue_options)
    try:
        protocol = guarded_protocol(max_connections=args.max_connections)
        uvicorn.run(create_app(jobs, **api_options), host=args.host, port=args.port, log_level="warning", http=protocol)
    finally:
        jobs.close(timeout=60)


def _serve_on_ray(args, directory: str, api_options: dict, engine_options: dict, queue_options: dict) -> None:
    try:
        import ray
        from ray import serve

        from cvg.serving.ray_serve import build_app
    except ImportError as e:
        raise ValueError(f"--ray-replicas needs Ray Serve (pip install 'ray[serve]'): {e}") from None
    stop = threading.Event()  # Ray's driver loop does not end on SIGINT: wait for it ourselves
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        replicas = args.ray_replicas
        app = build_app(str(args.model), directory, replicas, None, engine_options, api_options, **queue_options)
        serve.run(app, name="cvg", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
