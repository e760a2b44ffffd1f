"""`blip2 caption|ask|chat|embed`: using a trained model from the terminal."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from blip2.data.images import ImageError, load_image
from blip2.data.records import IMAGE_EXTENSIONS
from blip2.errors import InputError
from blip2.infer.batching import as_text_list
from blip2.infer.chat import CHAT_MAX_NEW_TOKENS
from blip2.infer.decoding import GenerationOptions
from blip2.io import check_writable, write_file_atomically
from blip2.pipeline import load

CHAT_OPTIONS = GenerationOptions(max_new_tokens=CHAT_MAX_NEW_TOKENS)
ONE_LINE = re.compile(r"[\t\r\n\v\f\u2028\u2029\x85]+")  # what would break a "PATH<TAB>CAPTION" line
CHAT_HELP = "commands: /image PATH (talk about another image), /reset (forget the conversation), /quit (or Ctrl-D)"


def caption(
    images: list[str],
    prompt: Annotated[str | None, "a prefix the caption continues, e.g. 'a photo of' (llm decoder only)"] = None,
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
                if not json_output:  # one line per image, whatever the caption holds
                    print(f"{path}\t{ONE_LINE.sub(' ', text)}", flush=True)
            progress.update(len(chunk))
    if json_output:
        print(json.dumps(results + [{"image": path, "error": error} for path, error in failures.items()], indent=2))
    return _report_failures(failures, "caption")


def ask(
    image: str,
    question: str,
    model: str = "default",
    prompt_template: Annotated[str | None, "the prompt with one {} for the question (default: BLIP-2's)"] = None,
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
    system: Annotated[str | None, "a system message that opens the conversation (default: the chat template's own)"] = None,
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
    texts: Annotated[list[str] | None, "texts to embed beside the images"] = None,
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
        raise InputError(f"--output {output}: the file name must end in .safetensors or .npz")
    check_writable(out, "--output")  # before minutes of encoding
    texts = as_text_list(texts or [], "text")
    files, failures = find_images(images)
    blip = load(model, device=device)
    loaded = _read_images(files, failures, "embed")
    image_embeds = blip.image_embeddings(list(loaded.values()), batch_size=batch_size).cpu()  # [N, Q, E]
    text_embeds = blip.text_embeddings(texts, batch_size=batch_size).cpu()  # [M, E]
    if out.suffix == ".npz":
        write_file_atomically(out, lambda tmp: np.savez(
            tmp, image_embeds=image_embeds.numpy(), text_embeds=text_embeds.numpy(),
            images=np.array(list(loaded), dtype=str), texts=np.array(texts, dtype=str)))  # fmt: skip
    else:
        metadata = {"images": json.dumps(list(loaded)), "texts": json.dumps(texts), "model": model}
        tensors = {"image_embeds": image_embeds.contiguous(), "text_embeds": text_embeds.contiguous()}
        write_file_atomically(out, lambda tmp: save_file(tensors, tmp, metadata))
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
        raise InputError(f"--batch-size must be >= 1, got {size}")
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
        except UnicodeDecodeError as error:
            print(f"blip2 chat: error: that line is not UTF-8 text ({error.reason} at byte {error.start}): "
                  "retype it", file=sys.stderr)
            continue
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
