"""The serving tests use the shared tiny random pipelines (tests/conftest.py ``tiny_model``: a Blip2VisionModel, a
MiniLM-tokenizer Q-Former, and a word-level Llama with a ChatML template, OPT or T5) and add images as file bytes."""

from __future__ import annotations

import pytest


@pytest.fixture
def pngs(image_files) -> list[bytes]:
    """Three different small PNG files (tests/conftest.py ``image_files``), as bytes."""
    return [path.read_bytes() for path in image_files]


class LiveServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a thread; ``url`` is its base URL."""

    def __init__(self, app):
        import socket
        import threading
        import time

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture
def serve(tiny_model):
    """Factory: ``serve(family="llama", web_app=False, index=None, engine={...}, **settings)`` -> (LiveServer, engine)
    around a tiny model; every server is stopped after the test."""
    from blip2.serve.engine import Engine
    from blip2.serve.http import ServerSettings, create_app

    servers = []

    def make(family="llama", web_app=False, index=None, engine=None, model=None, **settings):
        engine = Engine(model or tiny_model(family), **(engine or {}))
        server = LiveServer(create_app(engine, ServerSettings(model_name="tiny", **settings), index, web_app))
        servers.append(server)
        return server, engine

    yield make
    for server in servers:
        server.close()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    import base64

    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def data_url():
    """``data_url(file_bytes, media_type="image/png")`` -> a data: URL."""
    return _data_url
