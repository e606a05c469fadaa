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

from cvg.cli.arguments import POSITIVE, config_flags, config_from, given_fields, number
from cvg.cli.generation import OPTION_FLAGS, SETTING_FLAGS, SIZE_FLAGS, precision
from cvg.request import SERVED_STEPS, GenerationRequest, PipelineOptions

TOKEN_VARIABLE = "CVG_SERVE_TOKEN"


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
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (default 8000; 0: any free)")
    serve.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"a file holding the bearer token every request but /healthz must carry (default: ${TOKEN_VARIABLE}, "
        "else none)",
    )
    serve.add_argument(
        "--token",
        help="the bearer token itself: deprecated, any local user reads it in the process list (use "
        f"--token-file or ${TOKEN_VARIABLE})",
    )
    serve.add_argument(
        "--served-model-name",
        help="the name clients give as `model` and GET /v1/models lists (default: the model directory's name)",
    )
    serve.add_argument("--queue-size", type=POSITIVE, default=16, help="jobs that may wait (default 16; more: 429)")
    serve.add_argument(
        "--keep-seconds",
        type=number(float, 1),
        default=3600.0,
        help="how long a finished job and its files are kept (default 3600)",
    )
    serve.add_argument(
        "--out-dir", help="where the server writes job outputs (default: a new temporary directory of its own)"
    )
    serve.add_argument(
        "--max-batch",
        type=POSITIVE,
        default=1,
        help="queued jobs of the same settings run as one batch, up to this many (default 1: each alone, "
        "exact; batched items equal their solo runs to float rounding; a step engine is built once per batch size)",
    )
    serve.add_argument(
        "--batch-window",
        type=number(float, 0, 10),
        default=0.05,
        help="seconds a job waits for others to batch with (default 0.05)",
    )
    serve.add_argument(
        "--max-job-cost",
        type=number(float, 1),
        default=16.0,
        help="refuse a job costing more than this many times the server's default guided job (pixels x frames "
        "x (steps + 2 per guided update); default 16)",
    )
    serve.add_argument(
        "--job-timeout",
        type=number(float, 1),
        default=1800.0,
        help="a job still running after this many seconds fails at its next step (default 1800)",
    )
    serve.add_argument(
        "--max-connections",
        type=POSITIVE,
        help="open connections at most; past it the one waiting longest for its request is closed (default: "
        "1000, or fewer to stay under the process's file limit)",
    )
    serve.add_argument(
        "--ray-replicas",
        type=POSITIVE,
        help="run the engines as this many Ray Serve replicas on a local Ray cluster (the optional 'serve' "
        "extra), behind the same API",
    )
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
