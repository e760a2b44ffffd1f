"""`blip2 serve`: the OpenAI-compatible HTTP API and the web app, over one engine and one model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import torch

from blip2.errors import InputError
from blip2.pipeline import load

API_KEY_ENV = "BLIP2_API_KEY"


def serve(
    model: str = "default",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, "require this bearer key on /v1 (default: $BLIP2_API_KEY, else none)"] = None,
    model_name: Annotated[str | None, "the model's name for clients (default: the --model value)"] = None,
    device: str = "cpu",
    max_batch_size: int = 32,
    max_queue: int = 64,
    image_cache_mb: int = 256,
    prefix_cache_mb: int = 512,
    max_images: int = 1,
    max_image_mb: float = 20.0,
    max_image_pixels: int = 50_000_000,
    allow_remote_images: bool = False,
    remote_image_timeout: float = 10.0,
    allowed_local_media_path: Annotated[str | None, "read file:// images only under this folder"] = None,
    index: Annotated[str | None, "a `blip2 index build` folder: adds /v1/search and the search tab"] = None,
    app: bool = True,
    threads: int = 0,
    log_level: str = "info",
) -> int:
    """Serve a model over HTTP: the OpenAI API under /v1 and the "chat with your image" web app at /.

    POST /v1/chat/completions (images as data: URLs in image_url parts; "stream": true for server-sent events),
    GET /v1/models, POST /v1/embeddings (texts, and images as data: URLs: ITC embeddings), GET /health, GET /metrics.
    Binds 127.0.0.1 unless --host says otherwise. --api-key (or the environment variable BLIP2_API_KEY) makes every
    /v1 request need "Authorization: Bearer KEY" (the app then asks for it as the password). Clients name the model
    --model-name (default: the --model value). A conversation may hold --max-images images of at most --max-image-mb
    MB and --max-image-pixels pixels.
    Requests share one decode batch of up to --max-batch-size rows; --max-queue more wait, others get 429.
    Images are fetched from http(s) URLs only with --allow-remote-images, and read from file:// URLs only under
    --allowed-local-media-path. --index PATH (a `blip2 index build` folder) adds POST /v1/search and the app's
    search tab. --threads sets torch's CPU threads (0: torch's default). See docs/serving.md.
    """
    import uvicorn  # the server's dependencies (FastAPI, uvicorn, httpx, Gradio) load only for this command

    from blip2.serve.engine import Engine, MiB
    from blip2.serve.http import ServerSettings, create_app
    from blip2.serve.media import MediaPolicy

    if threads:
        torch.set_num_threads(threads)
    local_root = None
    if allowed_local_media_path is not None:
        local_root = Path(allowed_local_media_path).expanduser()
        if not local_root.is_dir():
            raise InputError(f"--allowed-local-media-path {allowed_local_media_path}: not a directory")
    policy = MediaPolicy(max_bytes=int(max_image_mb * MiB), max_pixels=max_image_pixels,
                         allow_remote=allow_remote_images, remote_timeout=remote_image_timeout,
                         local_root=local_root)  # fmt: skip
    settings = ServerSettings(model_name=model_name or model, api_key=api_key or os.environ.get(API_KEY_ENV) or None,
                              media=policy, max_images=max_images)  # fmt: skip
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    pipe = load(model, device=device)
    engine = Engine(pipe, max_batch=max_batch_size, max_queue=max_queue, image_cache_bytes=image_cache_mb * MiB,
                    prefix_cache_bytes=prefix_cache_mb * MiB)  # fmt: skip
    search_index = open_index(index, pipe) if index is not None else None
    server_app = create_app(engine, settings, index=search_index, web_app=app)
    where = f"http://{host}:{port}"
    print(f"serving {settings.model_name!r} at {where}/v1" + (f" and the app at {where}/" if app else ""),
          file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(server_app, host=host, port=port, log_level=log_level)
    return 0


def open_index(path: str, pipe):
    """The search index at ``path``, searched with the served model (``pipe``) if it built the index, else with the
    model recorded in the index (loaded on the first search)."""
    from blip2.search import Index, SearchIndexError

    found = Index.open(path)
    try:
        found.use_model(pipe)
    except SearchIndexError as error:
        print(f"--index {path}: {error}; searching with the model recorded in the index", file=sys.stderr)
    return found
