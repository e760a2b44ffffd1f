"""The HTTP API with a plain HTTP client: every kind of bad request gets a 4xx in OpenAI's error JSON (never a 5xx)
and the server still answers the next good one; image URLs (data:, http(s) behind the flag, file:// under the
allowed folder) with their limits; clients that go away free their row; /health and /metrics."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from functools import partial

import httpx
import pytest
from PIL import Image

SMALL = dict(max_bytes=6000, max_pixels=2500)  # pngs[0] (40 x 30) fits; pngs[2] (50 x 64 noise) is 9.6 kB


def png(size, colour="white") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_bad_request_gets_a_4xx_then_a_good_one_succeeds(serve, pngs, data_url):
    from blip2.serve.media import MediaPolicy

    server, engine = serve("llama", api_key="k", media=MediaPolicy(**SMALL), max_images=1)
    key = {"Authorization": "Bearer k"}
    image = {"type": "image_url", "image_url": {"url": data_url(pngs[0])}}

    def chat(**fields):
        return {"model": "tiny", "messages": [{"role": "user", "content": [image, {"type": "text", "text": "cat"}]}],
                "max_tokens": 4} | fields  # fmt: skip

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def url(text):
        return {"type": "image_url", "image_url": {"url": text}}

    cases = [  # (what, method, path, body (dict: JSON; bytes: raw), headers, status, words in the message)
        ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', key, 400, "not valid JSON"),
        ("no body", "POST", "/v1/chat/completions", b"", key, 400, "JSON body"),
        ("no messages", "POST", "/v1/chat/completions", {"model": "tiny"}, key, 400, "messages: Field required"),
        ("empty messages", "POST", "/v1/chat/completions", chat(messages=[]), key, 400, "messages: List should"),
        ("unknown role", "POST", "/v1/chat/completions", chat(messages=[{"role": "tool", "content": "x"}]), key, 400,
         "messages[0].role"),
        ("wrong type", "POST", "/v1/chat/completions", chat(max_tokens="ten"), key, 400, "max_tokens"),
        ("temperature out of range", "POST", "/v1/chat/completions", chat(temperature=5), key, 400, "temperature"),
        ("max_tokens 0", "POST", "/v1/chat/completions", chat(max_tokens=0), key, 400, "max_tokens"),
        ("unknown field", "POST", "/v1/chat/completions", chat(foo=1), key, 400, "foo: unknown field"),
        ("unknown part type", "POST", "/v1/chat/completions", chat(messages=user({"type": "video", "video": 1})), key,
         400, "messages[0].content[0]"),
        ("n > 1", "POST", "/v1/chat/completions", chat(n=2), key, 400, "n"),
        ("five stops", "POST", "/v1/chat/completions", chat(stop=list("abcde")), key, 400, "stop"),
        ("not an image", "POST", "/v1/chat/completions",
         chat(messages=user(url("data:text/plain;base64,aGVsbG8="))), key, 400, "'text/plain', not an image"),
        ("bad base64", "POST", "/v1/chat/completions", chat(messages=user(url("data:image/png;base64,@@"))), key, 400,
         "not valid base64"),
        ("undecodable image", "POST", "/v1/chat/completions",
         chat(messages=user(url(data_url(b"not a png at all")))), key, 400, "not a readable image"),
        ("too many bytes", "POST", "/v1/chat/completions", chat(messages=user(url(data_url(pngs[2])))), key, 413,
         "limit of 6000"),
        ("too many pixels", "POST", "/v1/chat/completions", chat(messages=user(url(data_url(png((100, 100)))))), key,
         413, "10000 pixels is above the limit of 2500 (possible decompression bomb): send a smaller image"),
        ("two images", "POST", "/v1/chat/completions", chat(messages=user(image, image)), key, 400, "at most 1"),
        ("remote URL not allowed", "POST", "/v1/chat/completions", chat(messages=user(url("http://example.com/a.png"))),
         key, 400, "--allow-remote-images"),
        ("local path not allowed", "POST", "/v1/chat/completions", chat(messages=user(url("file:///etc/passwd"))), key,
         400, "--allowed-local-media-path"),
        ("over the context", "POST", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": "cat " * 300}]), key, 400, "context of 256 tokens"),
        ("last message not from the user", "POST", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), key, 400,
         "last message"),
        ("empty user message", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": " "}]), key,
         400, "messages[0] is empty"),
        ("image in an assistant message", "POST", "/v1/chat/completions",
         chat(messages=[{"role": "assistant", "content": [image]}, {"role": "user", "content": "hi"}]), key, 400,
         "user messages"),
        ("unknown model", "POST", "/v1/chat/completions", chat(model="gpt-4o"), key, 404, "not served here"),
        ("no API key", "POST", "/v1/chat/completions", chat(), {}, 401, "Bearer"),
        ("wrong API key", "POST", "/v1/chat/completions", chat(), {"Authorization": "Bearer x"}, 401, "Bearer"),
        ("body too large", "POST", "/v1/chat/completions", b"x" * (9 << 20), key, 413, "limit"),
        ("unknown path", "GET", "/v1/nothing", None, key, 404, "Not Found"),
        ("wrong method", "GET", "/v1/chat/completions", None, key, 405, "Method Not Allowed"),
        ("empty embedding input", "POST", "/v1/embeddings", {"input": ["a cat", " "]}, key, 400, "input[1] is empty"),
        ("embedding text too long", "POST", "/v1/embeddings", {"input": "cat " * 100}, key, 400, "positions"),
        ("embedding dimensions", "POST", "/v1/embeddings", {"input": "cat", "dimensions": 8}, key, 400, "dimensions"),
    ]  # fmt: skip
    assert len({status for *_, status, _ in cases}) >= 5 and len(cases) >= 15
    with httpx.Client(base_url=server.url) as http:
        for what, method, path, body, headers, status, words in cases:
            content = body if isinstance(body, bytes) else (None if body is None else json.dumps(body).encode())
            response = http.request(method, path, content=content, headers={"Content-Type": "application/json",
                                                                            **headers})  # fmt: skip
            assert response.status_code == status, f"{what}: {response.status_code} {response.text[:300]}"
            error = response.json()["error"]
            assert words in error["message"], f"{what}: {error}"
            assert set(error) == {"message", "type", "param", "code"}
        good = http.post("/v1/chat/completions", json=chat(), headers=key)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    assert engine.stats.failed == 0


def test_image_urls_from_the_network_and_the_disk_with_their_limits(serve, pngs, data_url, tmp_path):
    from blip2.serve.media import MediaPolicy

    served = tmp_path / "www"
    served.mkdir()
    (served / "ok.png").write_bytes(pngs[0])
    (served / "big.png").write_bytes(pngs[2])
    (served / "slow.png").write_bytes(pngs[0])
    outside = tmp_path / "outside.png"
    outside.write_bytes(pngs[0])
    (served / "link.png").symlink_to(outside)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(1.0)  # longer than the server's remote_timeout below
            try:
                super().do_GET()
            except BrokenPipeError:  # the server gave up on the slow image, as it should
                pass

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    policy = MediaPolicy(max_bytes=6000, allow_remote=True, remote_timeout=0.3, local_root=served)
    server, engine = serve("llama", media=policy)

    def ask(image_url: str) -> httpx.Response:
        parts = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "cat"}]
        return httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": parts}], "max_tokens": 3})  # fmt: skip

    try:
        fetched, read, sent = ask(f"{base}/ok.png"), ask(f"file://{served / 'ok.png'}"), ask(data_url(pngs[0]))
        assert fetched.status_code == read.status_code == sent.status_code == 200
        assert fetched.json()["choices"] == read.json()["choices"] == sent.json()["choices"]
        assert engine.images.misses == 1  # one image, whichever way it came
        for image_url, status, words in [
            (f"{base}/big.png", 413, "limit of 6000"), (f"{base}/missing.png", 400, "HTTP 404"),
            (f"{base}/slow.png", 400, "took more than 0.3 s"), (f"file://{outside}", 400, "outside the allowed"),
            (f"file://{served / 'link.png'}", 400, "outside the allowed"), (f"file://{served}/../outside.png", 400,
            "outside the allowed"), ("ftp://host/a.png", 400, "unsupported image URL"),
        ]:  # fmt: skip
            response = ask(image_url)
            assert response.status_code == status and words in response.json()["error"]["message"], image_url
    finally:
        web.shutdown()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_row_at_once(serve, pngs, data_url, monkeypatch, stream):
    server, engine = serve("llama", engine=dict(max_batch=1, max_queue=0))
    forward, calls = engine.llm.model.forward, []
    gone = threading.Event()  # decoding waits until the client has gone and the server has cancelled its request

    def slow_forward(*args, **kwargs):  # a few ms per step, so that 200 tokens outlast the client
        calls.append(None)
        if len(calls) > 1:  # the prompt's forward runs; the decode steps wait (at most a minute, should the test fail)
            gone.wait(timeout=60)
        time.sleep(0.005)
        return forward(*args, **kwargs)

    def cancelled() -> bool:  # the request holding the row has been cancelled (or none holds it)
        return not engine.running or engine._rows[0].handle.cancelled

    monkeypatch.setattr(engine.llm.model, "forward", slow_forward)
    body = {"messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 200, "stream": stream,
            "temperature": 1.0, "seed": 0}  # fmt: skip
    try:
        with httpx.Client(base_url=server.url) as http:
            if stream:
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    next(response.iter_lines())  # the first chunk
                    while not (engine.running or engine.stats.finished or engine.stats.failed):
                        time.sleep(0.01)  # until the request takes the only row
                    assert engine.running, engine.stats
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(5.0, read=0.2))
            while not cancelled():  # the disconnect reaches the server while the engine waits in a decode step
                time.sleep(0.01)
            gone.set()
            while engine.running or engine.waiting:  # and the engine frees the row at its next step
                time.sleep(0.01)
            assert engine.stats.finished == {"cancelled": 1}
            assert engine.stats.generated_tokens <= 2  # the prompt's first token and the step in flight
            again = http.post("/v1/chat/completions", json=body | {"stream": False, "max_tokens": 2})
            assert again.status_code == 200
    finally:
        gone.set()


def test_health_and_metrics(serve, pngs, data_url):
    server, engine = serve("llama")
    parts = [{"type": "image_url", "image_url": {"url": data_url(pngs[0])}}, {"type": "text", "text": "cat"}]
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").json() == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0}
        for _ in range(2):
            assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}],
                                                           "max_tokens": 3}).status_code == 200  # fmt: skip
        text = http.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["blip2_requests_total"] == 2 and values["blip2_queue_length"] == 0
    assert values["blip2_image_cache_hits_total"] == 1 and values["blip2_image_cache_hit_rate"] == 0.5
    assert values["blip2_prefix_cache_hits_total"] == 1 and values["blip2_prefix_cache_reused_tokens_total"] > 0
    assert values["blip2_generated_tokens_total"] == engine.stats.generated_tokens > 0
    assert sum(v for k, v in values.items() if k.startswith("blip2_requests_finished_total")) == 2
    assert "# TYPE blip2_tokens_per_second gauge" in text and values["blip2_running_requests"] == 0
