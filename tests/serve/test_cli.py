"""`blip2 serve` as a user runs it: a real subprocess on a tiny saved checkpoint serves the API (with an API key from
the environment) and the app, and stops cleanly on Ctrl-C; bad options are one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from blip2.cli import main
from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.factory import build
from blip2.pipeline import Blip2Pipeline

TINY_QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                    num_query_tokens=4, embed_dim=16, cross_attention_freq=1, init_from=None)  # fmt: skip


@pytest.fixture
def checkpoint(tiny_parts, randomize, tmp_path):
    """A tiny model saved by blip2 (frozen parts named by path) -> its directory."""
    vision_dir, llm_dir = tiny_parts("opt")
    cfg = Blip2Config(vision=VisionConfig(kind="hf", path=str(vision_dir)), qformer=QFormerConfig(**TINY_QFORMER),
                      llm=LLMConfig(kind="hf", path=str(llm_dir)))  # fmt: skip
    pipe = Blip2Pipeline.from_parts(build(cfg, init_qformer=False))
    for offset, part in enumerate([pipe.model.qformer, pipe.model.vision_norm, pipe.model.llm_proj]):
        randomize(part, 10 + offset)
    return pipe.save(tmp_path / "checkpoint")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_blip2_serve_runs_the_api_and_the_app_until_ctrl_c(checkpoint, pngs, data_url):
    port = free_port()
    env = os.environ | {"BLIP2_API_KEY": "sesame", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "blip2.cli", "serve", "--model", str(checkpoint), "--port",
                               str(port), "--threads", "1", "--max-batch-size", "4"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:  # until it listens (or dies)
            assert server.poll() is None, server.stderr.read()
            try:
                health = httpx.get(url + "/health")
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert health.json()["model"] == str(checkpoint)
        parts = [{"type": "image_url", "image_url": {"url": data_url(pngs[0])}}, {"type": "text", "text": "w1 w2"}]
        body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 5}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        reply = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate()
    assert server.returncode == 0, err
    assert f"serving '{checkpoint}' at {url}/v1 and the app at {url}/" in err


def test_bad_options_are_one_line_errors(checkpoint, tmp_path, capsys):
    assert main(["serve", "--model", str(checkpoint), "--allowed-local-media-path", str(tmp_path / "no")]) == 2
    assert capsys.readouterr().err.strip() == (f"blip2 serve: error: --allowed-local-media-path {tmp_path / 'no'}: "
                                               "not a directory")  # fmt: skip
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "is neither a preset" in capsys.readouterr().err
