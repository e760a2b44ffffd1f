"""The CLI's commands: each is a typed function over the Python API (``blip2.cli`` builds the parser)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from blip2.api import load
from blip2.config import ConfigError
from blip2.data.datasets import IMAGE_EXTENSIONS
from blip2.data.images import ImageError, load_image
from blip2.infer.batching import as_text_list
from blip2.infer.chat import CHAT_MAX_NEW_TOKENS
from blip2.infer.decoding import GenerationOptions
from blip2.weights.keymap import KeyMapError
from blip2.weights.offline import MissingPartError

# Errors that mean "the input was wrong", printed as one clear line instead of a traceback.
USER_ERRORS = (ConfigError, KeyMapError, MissingPartError, FileNotFoundError, ValueError)


def describe(model) -> dict:
    """Components, parameter counts, preprocessing and dtypes of a loaded model."""
    cfg = model.cfg
    pre = model.vision.preprocess
    return {
        "vision": {**cfg.vision.__dict__, "tokens": model.vision.num_tokens(), "width": model.vision.out_dim,
                   "dtype": str(model.vision_dtype).removeprefix("torch.")},
        "preprocess": {"size": list(pre.size), "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation},
        "qformer": {k: getattr(cfg.qformer, k) for k in ("hidden_size", "num_layers", "num_heads", "num_query_tokens",
                                                        "cross_attention_freq", "encoder_width", "init_from")},
        "llm": None if model.llm is None else {
            **cfg.llm.__dict__, "family": "encoder-decoder" if model.llm.is_encoder_decoder else "decoder-only",
            "hidden_size": model.llm.hidden_size, "dtype": str(model.llm.dtype).removeprefix("torch."),
        },
        "parameters": model.parameter_counts(),
    }


def info(source: str = "default", json_output: bool = False) -> None:
    """Show a model's components, parameter counts (trainable / frozen), preprocessing and dtype.

    SOURCE is a preset ("default": EfficientNet-Lite0 + MiniLM Q-Former + SmolLM2-135M-Instruct), a directory saved
    by blip2, a transformers Blip2 directory, or a LAVIS .pth file.
    """
    summary = describe(load(source))
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    counts = summary["parameters"]
    print(f"model: {source}")
    v = summary["vision"]
    print(f"  image encoder : {v['kind']}{' ' + v['name'] if v['name'] else ''} -> {v['tokens']} tokens x {v['width']} ({v['dtype']}, frozen)")
    p = summary["preprocess"]
    print(f"  preprocess    : {p['size'][0]}x{p['size'][1]} {p['interpolation']}, mean {p['mean']}, std {p['std']}")
    q = summary["qformer"]
    print(f"  Q-Former      : {q['num_layers']} layers x {q['hidden_size']} ({q['num_heads']} heads), {q['num_query_tokens']} queries, "
          f"cross-attention every {q['cross_attention_freq']} layer(s), init {q['init_from']}")
    if summary["llm"]:
        llm = summary["llm"]
        print(f"  LLM           : {llm['kind']}{' ' + llm['path'] if llm['path'] else ''} ({llm['family']}, hidden {llm['hidden_size']}, {llm['dtype']}, frozen)")
    else:
        print("  LLM           : none (stage-1 model)")
    print(f"  parameters    : {counts['trainable']:,} trainable, {counts['frozen']:,} frozen")


# ---- inference commands -------------------------------------------------------------------------------------------

CHAT_OPTIONS = GenerationOptions(max_new_tokens=CHAT_MAX_NEW_TOKENS)
CHAT_HELP = "commands: /image PATH (talk about another image), /reset (forget the conversation), /quit (or Ctrl-D)"


def caption(
    images: list[str],
    prompt: str | None = None,
    model: str = "default",
    decoder: Literal["llm", "qformer"] = "llm",
    batch_size: int = 8,
    device: str = "cpu",
    json_output: bool = False,
    gen: GenerationOptions = GenerationOptions(),
) -> int:
    """Caption images: files, or folders searched recursively.

    Prints "PATH<TAB>CAPTION" per image (or a JSON list with --json). --prompt gives a prefix the caption continues
    ("a photo of"). --decoder qformer captions with the Q-Former alone (stage-1 models too). An image that cannot be
    read is reported on stderr and skipped; the exit status is then 1.
    """
    if prompt is not None:
        as_text_list(prompt, "prompt")
    files, failures = find_images(images)
    blip = load(model, device=device)
    results = []
    with tqdm(total=len(files), unit="image", file=sys.stderr, disable=None) as progress:
        for chunk in _chunks(files, batch_size):
            loaded = _read_images(chunk, failures, "caption")
            pictures = list(loaded.values())
            if decoder == "qformer":
                texts = blip.qformer_caption(pictures, batch_size=batch_size, **dataclasses.asdict(gen))
            else:
                texts = blip.caption(pictures, prompt, batch_size=batch_size, **dataclasses.asdict(gen))
            for path, text in zip(loaded, texts):
                results.append({"image": path, "caption": text})
                if not json_output:
                    print(f"{path}\t{text}", flush=True)
            progress.update(len(chunk))
    if json_output:
        print(json.dumps(results + [{"image": path, "error": error} for path, error in failures.items()], indent=2))
    return _report_failures(failures, "caption")


def ask(
    image: str,
    question: str,
    model: str = "default",
    prompt_template: str | None = None,
    device: str = "cpu",
    json_output: bool = False,
    gen: GenerationOptions = GenerationOptions(),
) -> None:
    """Answer a question about an image.

    The question goes into BLIP-2's prompt, "Question: {} Answer:" ("... Short answer:" for Flan-T5), unless
    --prompt-template (with one {}) says otherwise.
    """
    picture = load_image(image)
    as_text_list(question, "question")
    answer = load(model, device=device).answer(picture, question, prompt_template, **dataclasses.asdict(gen))[0]
    print(json.dumps({"image": image, "question": question, "answer": answer}) if json_output else answer)


def chat(
    image: str,
    model: str = "default",
    system: str | None = None,
    device: str = "cpu",
    json_output: bool = False,
    gen: GenerationOptions = CHAT_OPTIONS,
) -> int:
    """Chat about an image in the terminal; replies stream as they are written.

    Type a message and Enter. /image PATH switches to another image (the conversation starts over), /reset
    forgets the conversation, /quit or end of input (Ctrl-D) leaves, Ctrl-C stops a reply. With --json each
    reply is printed as one JSON line {"user": ..., "assistant": ...} once complete.
    """
    session = load(model, device=device).chat(load_image(image), system=system)
    options = dataclasses.asdict(gen)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    for line in _input_lines("you> " if interactive else ""):
        if line.startswith("/"):
            if not _chat_command(session, line):
                break
            continue
        try:
            if json_output:
                print(json.dumps({"user": line, "assistant": session.ask(line, **options)}), flush=True)
            else:
                _print_stream(session.stream(line, **options))
        except ValueError as error:  # e.g. the conversation outgrew the context: the session stays usable
            print(f"blip2 chat: error: {error}", file=sys.stderr)
    return 0


def embed(
    images: list[str],
    texts: list[str] | None = None,
    output: str = "embeddings.safetensors",
    model: str = "default",
    batch_size: int = 32,
    device: str = "cpu",
    json_output: bool = False,
) -> int:
    """Write ITC embeddings of images (files or folders, recursively) and of --texts to a .safetensors or .npz file.

    Tensors: "image_embeds" [N, Q, 256] (one per query, normalised) and "text_embeds" [M, 256] (normalised);
    the image paths and texts are stored beside them (safetensors metadata "images"/"texts", or npz arrays).
    Unreadable images are reported on stderr and skipped; the exit status is then 1.
    """
    out = Path(output)
    if out.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"--output {output}: the file name must end in .safetensors or .npz")
    texts = as_text_list(texts or [], "text")
    files, failures = find_images(images)
    blip = load(model, device=device)
    loaded = _read_images(files, failures, "embed")
    image_embeds = blip.image_embeddings(list(loaded.values()), batch_size=batch_size).cpu()  # [N, Q, E]
    text_embeds = blip.text_embeddings(texts, batch_size=batch_size).cpu()  # [M, E]
    if out.suffix == ".npz":
        np.savez(out, image_embeds=image_embeds.numpy(), text_embeds=text_embeds.numpy(),
                 images=np.array(list(loaded), dtype=str), texts=np.array(texts, dtype=str))  # fmt: skip
    else:
        metadata = {"images": json.dumps(list(loaded)), "texts": json.dumps(texts), "model": model}
        save_file({"image_embeds": image_embeds.contiguous(), "text_embeds": text_embeds.contiguous()}, out, metadata)
    summary = {"output": str(out), "image_embeds": list(image_embeds.shape), "text_embeds": list(text_embeds.shape),
               "failed": sorted(failures)}  # fmt: skip
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {out}: image_embeds {list(image_embeds.shape)}, text_embeds {list(text_embeds.shape)}")
    return _report_failures(failures, "embed")


# ---- helpers for the inference commands ----------------------------------------------------------------------------


def find_images(paths: list[str]) -> tuple[list[str], dict[str, str]]:
    """Files as given, folders expanded to the image files under them (sorted) -> (files, {path: problem})."""
    files, failures = [], {}
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            files.append(path)
            continue
        found = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower()[1:] in IMAGE_EXTENSIONS)
        if not found:
            failures[path] = f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
        files += found
    return files, failures


def _chunks(items: list, size: int) -> Iterator[list]:
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _read_images(paths: list[str], failures: dict[str, str], command: str) -> dict[str, Image.Image]:
    """Decode each file; one that fails is reported on stderr (one line) and recorded in ``failures``."""
    loaded = {}
    for path in paths:
        try:
            loaded[path] = load_image(path)
        except ImageError as error:
            failures[path] = error.cause
            print(f"blip2 {command}: error: {error}", file=sys.stderr)
    return loaded


def _report_failures(failures: dict[str, str], command: str) -> int:
    if failures:
        print(f"blip2 {command}: {len(failures)} input(s) failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


def _input_lines(prompt: str) -> Iterator[str]:
    """Non-empty, stripped input lines until end of input (Ctrl-D) or Ctrl-C at the prompt."""
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            if prompt:
                print(file=sys.stderr)
            return
        if line.strip():
            yield line.strip()


def _chat_command(session, line: str) -> bool:
    """Run a /command; False means leave."""
    command, _, argument = line.partition(" ")
    if command in ("/quit", "/exit"):
        return False
    if command == "/reset":
        session.reset()
        print("(conversation cleared)", file=sys.stderr)
    elif command == "/image" and argument.strip():
        try:
            session.set_image(argument.strip())
            print(f"(now talking about {argument.strip()}; conversation cleared)", file=sys.stderr)
        except ImageError as error:
            print(f"blip2 chat: error: {error} (still talking about the previous image)", file=sys.stderr)
    else:
        print(CHAT_HELP, file=sys.stderr)
    return True


def _print_stream(pieces) -> None:
    """Print a reply as it streams; Ctrl-C stops it (the partial reply stays in the conversation)."""
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pieces.close()
        print(" [stopped]", end="")
    print(flush=True)


COMMANDS = [info, caption, ask, chat, embed]
