"""Serving under load: `blip2 serve` (continuous batching, image and prefix caches) against a plain FastAPI server
that calls transformers' ``Blip2ForConditionalGeneration.generate`` once per request, one request at a time.

Both serve the same exported model directory (``model.export_hf``: a random ViT-S/16 tower cut to 4 layers, the
demo's Q-Former, SmolLM2-135M-Instruct; transformers' Blip2 holds no other vision tower) on loopback, one after the
other, with the same OpenAI streaming API and the same token layout (the LLM's chat template, the image's query
positions opening the first user message). ``--clients`` concurrent clients (32) each hold 3-turn conversations
about one of 8 images for ``--seconds`` (60), each turn a streamed request of up to ``--max-tokens`` (32) greedy
tokens; a client's n-th conversation is the same on both servers (its image and questions come from its own seed).

Printed: completion tokens/s, time to first token and whole-turn latency per turn (p50/p99), errors, our batch
sizes and cache hit rates, how many replies were identical on both sides, and the idle single-request latency of
the engine against transformers' ``generate`` on the same tokens (``model.chat(image, cache=False).ask``) in one
process.
``python benchmarks/serve.py [--quick] [--clients 32] [--seconds 60] [--threads 1]``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

HERE = Path(__file__).resolve().parent
QUESTIONS = [
    "What is in the picture?", "What colours do you see?", "How many shapes are there?", "Where is the largest shape?",
    "Is there a circle?", "Describe the background.", "Which shape is on the left?", "Is anything red?",
    "What is the smallest thing?", "Are the shapes touching?", "Describe the picture in one sentence.",
    "What shape is in the middle?", "Is there a square?", "What colour is the background?", "Name one shape.",
    "Are there more than two shapes?",
]  # fmt: skip
THROUGHPUT_TARGET, TTFT_TARGET, IDLE_TARGET = 4.0, 3.0, 0.95


# ---- the baseline server: transformers' generate per request, one at a time --------------------------------------


def baseline_app(directory: str):
    """A plain FastAPI wrapper around ``Blip2ForConditionalGeneration.generate`` (streamed with
    ``TextIteratorStreamer``), serving requests one at a time."""
    import transformers
    from fastapi import Body, FastAPI
    from fastapi.responses import StreamingResponse
    from PIL import Image

    from blip2.data.conversation import IMAGE_ID, TemplateFormat
    from blip2.data.text import LLMTokenizer

    model = transformers.Blip2ForConditionalGeneration.from_pretrained(directory, local_files_only=True).eval()
    processor = transformers.Blip2Processor.from_pretrained(directory, local_files_only=True)
    tokenizer = processor.tokenizer
    layout = TemplateFormat(LLMTokenizer(tokenizer, is_encoder_decoder=False))  # the token layout ours renders
    image_token, queries = model.config.image_token_id, model.config.num_query_tokens
    one_at_a_time = asyncio.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict = Body(...)):
        messages, image = [], None
        for message in body["messages"]:
            parts = message["content"] if isinstance(message["content"], list) else [
                {"type": "text", "text": message["content"]}]  # fmt: skip
            for part in parts:
                if part["type"] == "image_url":
                    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                    image = Image.open(io.BytesIO(data)).convert("RGB")
            text = " ".join(part["text"] for part in parts if part["type"] == "text").strip()
            messages.append({"role": message["role"], "content": text})
        ids = [image_token if t == IMAGE_ID else t for t in layout.token_ids(messages, queries)]

        async def events():
            async with one_at_a_time:
                streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                input_ids = torch.tensor([ids])  # [1, L]
                result = {}

                def work():
                    with torch.no_grad():
                        pixel_values = processor.image_processor(image, return_tensors="pt").pixel_values
                        result["out"] = model.generate(
                            pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=body["max_tokens"], do_sample=False, streamer=streamer,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        )  # fmt: skip

                worker = threading.Thread(target=work)
                worker.start()
                pieces = iter(streamer)
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    if piece:
                        yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}) + "\n\n"
                await asyncio.to_thread(worker.join)
                tokens = result["out"].shape[1] - len(ids)
            yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": tokens}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


# ---- the load ---------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    client: int
    conversation: int
    turn: int
    ttft: float
    latency: float
    tokens: int
    text: str
    end: float  # time.perf_counter() when the turn finished


async def client_loop(http: httpx.AsyncClient, client: int, images: list[str], args, deadline: float, turns: list,
                      errors: list):  # fmt: skip
    """Conversations, each turn started before ``deadline``; finished turns are appended to ``turns``."""
    rng = random.Random(client)
    for conversation in range(10**6):
        image = images[(client + conversation) % len(images)]
        questions = rng.sample(QUESTIONS, 3)
        messages = []
        for turn, question in enumerate(questions):
            if time.perf_counter() >= deadline:
                return
            content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]
            messages.append({"role": "user", "content": content if turn == 0 else question})
            body = {"model": "bench", "messages": messages, "max_tokens": args.max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            start, first, text, tokens, done = time.perf_counter(), None, "", None, False
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[len("data: ") :])
                        if "error" in chunk:
                            errors.append(chunk["error"]["message"])
                        for choice in chunk.get("choices", []):
                            piece = choice["delta"].get("content")
                            if piece:
                                first = first or time.perf_counter()
                                text += piece
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")
                return
            end = time.perf_counter()
            if not done or tokens is None:
                errors.append("the stream ended without [DONE] or usage")
                return
            turns.append(Turn(client, conversation, turn, (first or end) - start, end - start, tokens, text, end))
            messages.append({"role": "assistant", "content": text})


async def load(url: str, images: list[str], args) -> tuple[list[Turn], list[str], float]:
    """``args.clients`` clients start turns for ``args.seconds``; the turns then running are waited for (their
    latencies count, their tokens do not: throughput counts the turns finished within the window).
    -> (turns, errors, the deadline)."""
    turns, errors = [], []
    deadline = time.perf_counter() + args.seconds
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        await asyncio.gather(*(client_loop(http, c, images, args, deadline, turns, errors) for c in range(args.clients)))
    return turns, errors, deadline


# ---- servers ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server failed to start:\n{process.stderr.read()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health")
            return process
        except httpx.ConnectError:
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def run_side(name: str, command: list[str], port: int, images: list[str], args) -> dict:
    url = f"http://127.0.0.1:{port}"
    process = start(command, port)
    try:
        asyncio.run(warm_up(url, images))
        before = metrics(url) if name == "ours" else {}
        turns, errors, deadline = asyncio.run(load(url, images, args))
        after = metrics(url) if name == "ours" else {}
    finally:
        stop(process)
    return {"turns": turns, "errors": errors, "deadline": deadline,
            "metrics": {k: after[k] - before.get(k, 0) for k in after}}  # fmt: skip


async def warm_up(url: str, images: list[str]) -> None:
    """One request, so that first-call costs (imports, allocations) are not timed."""
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[0]}},
                                                          {"type": "text", "text": "Hello"}]}],
                "max_tokens": 2, "stream": True}  # fmt: skip
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass


# ---- idle latency: the engine against model.generate, in this process -------------------------------------------


def idle_latency(directory: str, pictures, args, repeats: int) -> tuple[list[float], list[float], int]:
    """Seconds for one chat request alone: the engine (caches off) against ``model.chat(image, cache=False).ask``,
    which encodes the image and calls transformers' ``generate`` on the rendered conversation (the same tokens);
    -> (engine seconds, generate seconds, tokens per reply)."""
    import common

    from blip2.infer.decoding import GenerationOptions
    from blip2.pipeline import load
    from blip2.serve.engine import Engine
    from blip2.serve.prompts import Message, UserImage

    model = load(directory)
    engine = Engine(model, image_cache_bytes=0, prefix_cache_bytes=0)  # no cache: the same work as generate
    images = [UserImage.from_bytes(png(picture), 10**8) for picture in pictures]
    question, replies, tokens = QUESTIONS[0], {}, []
    state = {"i": 0}

    def ours():
        image = images[state["i"] % len(images)]
        handle = engine.submit(engine.prompt([Message("user", question, (image,))]),
                               GenerationOptions(max_new_tokens=args.max_tokens))  # fmt: skip
        while engine.busy:
            engine.step()
        result = handle.result()
        replies.setdefault(image.key, set()).add(result.text)
        tokens.append(result.usage.completion_tokens)

    def theirs():
        image = images[state["i"] % len(images)]
        replies.setdefault(image.key, set()).add(model.chat(image.image, cache=False).ask(question,
                                                                                          max_new_tokens=args.max_tokens))
        state["i"] += 1

    seconds = common.interleaved({"engine": ours, "generate": theirs}, repeats)
    if any(len(texts) != 1 for texts in replies.values()):
        raise AssertionError(f"the engine and generate disagree: {replies}")
    return seconds["engine"], seconds["generate"], round(statistics.mean(tokens))


# ---- report -----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    sys.path.insert(0, str(HERE))
    import common
    import model_pair

    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--clients", type=int, default=None, help="concurrent clients (default 32; --quick: 4)")
    options.add_argument("--seconds", type=float, default=None, help="load per side (default 60; --quick: 4)")
    options.add_argument("--max-tokens", type=int, default=None, help="per turn (default 32; --quick: 6)")
    options.add_argument("--baseline-server", metavar="DIR", help=argparse_hide())
    options.add_argument("--port", type=int, default=0, help=argparse_hide())
    args = options.parse_args()
    if args.baseline_server:  # the baseline's own process
        import uvicorn

        torch.set_num_threads(args.threads)
        uvicorn.run(baseline_app(args.baseline_server), host="127.0.0.1", port=args.port, log_level="warning")
        return
    args.clients = args.clients or (4 if args.quick else 32)
    args.seconds = args.seconds or (4.0 if args.quick else 60.0)
    args.max_tokens = args.max_tokens or (6 if args.quick else 32)
    repeats = common.setup(args, default_repeats=9)
    with tempfile.TemporaryDirectory() as workdir:
        model = model_pair.ours(args.quick)
        directory = str(model.export_hf(Path(workdir) / "blip2-hf"))
        del model
        pictures = model_pair.scene_images(8)
        images = ["data:image/png;base64," + base64.b64encode(png(p)).decode() for p in pictures]
        results = {}
        for name in ("ours", "transformers"):
            port = free_port()
            command = ([sys.executable, "-m", "blip2.cli", "serve", "--model", directory, "--model-name", "bench",
                        "--port", str(port), "--threads", str(args.threads), "--no-app", "--max-batch-size",
                        str(args.clients), "--max-queue", str(2 * args.clients), "--log-level", "warning"]
                       if name == "ours" else
                       [sys.executable, __file__, "--baseline-server", directory, "--port", str(port), "--threads",
                        str(args.threads)])  # fmt: skip
            print(f"{name}: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
            results[name] = run_side(name, command, port, images, args)
        idle = idle_latency(directory, pictures, args, repeats)
    report(results, *idle, args)


def argparse_hide():
    import argparse

    return argparse.SUPPRESS


def report(results: dict, engine_seconds: list[float], generate_seconds: list[float], idle_tokens: int, args) -> None:
    import common

    print(f"\n{args.clients} clients start turns for {args.seconds:.0f} s per server (3-turn conversations about 8 "
          f"images, up to {args.max_tokens} greedy tokens per turn, streamed); the turns running at the end are waited "
          "for: their times count, their tokens do not (tokens/s counts the turns finished within the window)\n")
    rows, summary = [], {}
    for name, result in results.items():
        turns = result["turns"]
        tokens = sum(t.tokens for t in turns if t.end <= result["deadline"])
        summary[name] = {"tokens_per_second": tokens / args.seconds,
                         "ttft_late": statistics.median([t.ttft for t in turns if t.turn > 0] or [float("nan")])}
        for turn in range(3):
            mine = [t for t in turns if t.turn == turn]
            rows.append((name, turn + 1, len(mine), f"{percentile([t.ttft for t in mine], 50):.2f} / "
                         f"{percentile([t.ttft for t in mine], 99):.2f}", f"{percentile([t.latency for t in mine], 50):.2f}"
                         f" / {percentile([t.latency for t in mine], 99):.2f}", sum(t.tokens for t in mine)))  # fmt: skip
    common.table(["server", "turn", "turns", "first token p50 / p99 (s)", "whole turn p50 / p99 (s)",
                  "completion tokens"], rows)  # fmt: skip
    common.table(["server", "completion tokens/s", "turns finished in the window", "errors"],
                 [(name, f"{summary[name]['tokens_per_second']:.1f}",
                   sum(t.end <= result["deadline"] for t in result["turns"]), len(result["errors"]))
                  for name, result in results.items()])  # fmt: skip
    for name, result in results.items():
        for error in result["errors"][:3]:
            print(f"{name} error: {error}")
    m = results["ours"]["metrics"]
    steps = m.get("blip2_decode_steps_total", 0)
    looked = m.get("blip2_image_cache_hits_total", 0) + m.get("blip2_image_cache_misses_total", 0)
    prompt = m.get("blip2_prompt_tokens_total", 0)
    print(f"ours: mean decode batch {m.get('blip2_decode_rows_total', 0) / max(steps, 1):.1f} rows over {steps:.0f} "
          f"steps; image cache hit rate {m.get('blip2_image_cache_hits_total', 0) / max(looked, 1):.2f}; prefix cache "
          f"hit rate {m.get('blip2_prefix_cache_hits_total', 0) / max(m.get('blip2_prefix_cache_lookups_total', 0), 1):.2f}, "
          f"prompt positions reused {m.get('blip2_prefix_cache_reused_tokens_total', 0) / max(prompt, 1):.2f}")
    theirs = {(t.client, t.conversation, t.turn): t.text for t in results["transformers"]["turns"]}
    ours = {(t.client, t.conversation, t.turn): t.text for t in results["ours"]["turns"]}
    common_keys = [k for k in ours if k in theirs and all((k[0], k[1], j) in theirs for j in range(k[2]))]
    same = sum(ours[k].strip() == theirs[k].strip() for k in common_keys)
    print(f"replies identical on both servers: {same} of the {len(common_keys)} turns both completed\n")
    print(f"idle, one chat request at a time ({idle_tokens} tokens per reply, greedy, caches off): engine "
          f"{common.spread(engine_seconds)}; model.chat(image, cache=False).ask, i.e. transformers' generate on the "
          f"same tokens: {common.spread(generate_seconds)}\n")
    common.ratio_line("completion tokens/s under load", summary["ours"]["tokens_per_second"] /
                      max(summary["transformers"]["tokens_per_second"], 1e-9), THROUGHPUT_TARGET,
                      "ours / transformers generate per request, higher is better")  # fmt: skip
    common.ratio_line("p50 time to first token, turns 2-3", summary["transformers"]["ttft_late"] /
                      summary["ours"]["ttft_late"], TTFT_TARGET, "transformers / ours, higher is better")  # fmt: skip
    common.ratio_line("idle single-request latency", common.median(generate_seconds) / common.median(engine_seconds),
                      IDLE_TARGET, "generate / engine, higher is better")  # fmt: skip
    errors = sum(len(result["errors"]) for result in results.values())
    print(f"errors: {errors} (target 0)")


if __name__ == "__main__":
    main()
