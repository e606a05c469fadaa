"""`cvg serve`: video jobs over HTTP (`cvg.serving.api`) on a loaded model."""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading

from cvg.cli.arguments import POSITIVE, STEPS, number
from cvg.models import PRECISIONS
from cvg.runtime import STEP_BACKENDS

TOKEN_VARIABLE = "CVG_SERVE_TOKEN"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve video jobs over HTTP (POST /v1/videos, poll, fetch, DELETE to cancel)",
        description="Serve a local diffusers pipeline as asynchronous video jobs: POST /v1/videos, "
        "GET /v1/videos/{id}, GET /v1/videos/{id}/content, DELETE /v1/videos/{id}, /healthz, /metrics; "
        "the OpenAPI spec at /openapi.json.",
    )
    serve.add_argument("--model", required=True, help="local diffusers pipeline directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=number(int, 0, 65535), default=8000, help="port (default 8000; 0: any free)")
    serve.add_argument(
        "--token",
        help=f"bearer token every request but /healthz must carry (default: ${TOKEN_VARIABLE}, else none)",
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
        "--ray-replicas",
        type=POSITIVE,
        help="run the engines as this many Ray Serve replicas on a local Ray cluster (the optional 'serve' "
        "extra), behind the same API",
    )
    serve.add_argument("--classifier", metavar="DIR", help="guide with a classifier from cvg train-classifier")
    serve.add_argument("--steps", type=STEPS, default=20, help="default denoising steps of a job (default 20)")
    serve.add_argument("--dtype", choices=PRECISIONS, default="float32", help="transformer precision")
    serve.add_argument(
        "--batch-cfg",
        action=argparse.BooleanOptionalAction,
        help="a step's conditional and unconditional forwards as one batch (default: as the model's pipeline)",
    )
    serve.add_argument(
        "--engine",
        choices=(*STEP_BACKENDS, "auto", "eager"),
        default="auto",
        help="step engine of the unguided forwards (default auto; eager: diffusers' own forwards)",
    )
    serve.set_defaults(run=serve_jobs)


def serve_jobs(args: argparse.Namespace) -> None:
    import torch

    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    directory = args.out_dir or tempfile.mkdtemp(prefix="cvg-serve-")
    engine_options = {
        "num_inference_steps": args.steps,
        "classifier": args.classifier,
        "backend": None if args.engine == "eager" else args.engine,
        "transformer_dtype": getattr(torch, args.dtype),
        "batch_cfg": args.batch_cfg,
    }
    queue_options = {
        "max_queued": args.queue_size,
        "keep_seconds": args.keep_seconds,
        "max_batch": args.max_batch,
        "batch_window": args.batch_window,
    }
    print(f"cvg serve: {args.model} on http://{args.host}:{args.port}, outputs in {directory}", flush=True)
    if args.ray_replicas:
        _serve_on_ray(args, directory, token, engine_options, queue_options)
    else:
        _serve_here(args, directory, token, engine_options, queue_options)


def _serve_here(args, directory: str, token: str | None, engine_options: dict, queue_options: dict) -> None:
    import uvicorn

    from cvg.serving.api import create_app
    from cvg.serving.jobs import EngineRunner, JobQueue
    from cvg.serving.service import Engine

    jobs = JobQueue(EngineRunner(Engine(args.model, **engine_options)), directory, **queue_options)
    try:
        uvicorn.run(create_app(jobs, token), host=args.host, port=args.port, log_level="warning")
    finally:
        jobs.close(timeout=60)


def _serve_on_ray(args, directory: str, token: str | None, engine_options: dict, queue_options: dict) -> None:
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
        app = build_app(str(args.model), directory, args.ray_replicas, None, engine_options, token, **queue_options)
        serve.run(app, name="cvg", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
