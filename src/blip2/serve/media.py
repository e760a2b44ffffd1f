"""Images named in requests: ``data:`` URLs always; ``http(s)://`` URLs only when remote fetching is allowed (with a
size and a time limit); ``file://`` URLs only under an allowed local folder. Every refusal is a ``MediaError`` with
the HTTP status to answer (400, or 413 for too many bytes or pixels) and a message naming the cause and the remedy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

from blip2.data.images import DEFAULT_MAX_PIXELS, ImageError
from blip2.errors import InputError
from blip2.serve.prompts import UserImage


class MediaError(InputError):
    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int = 20 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_remote: bool = False
    remote_timeout: float = 10.0
    local_root: Path | None = None  # file:// URLs must resolve inside it


async def fetch_image(url: str, policy: MediaPolicy, where: str) -> UserImage:
    """The decoded image that ``url`` names; ``where`` says which part of the request it is (for messages)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, where, policy)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaError(f"{where}: fetching http(s) image URLs is disabled on this server; send the image as a "
                             "data: URL (base64), or start the server with --allow-remote-images")  # fmt: skip
        data = await _remote_bytes(url, where, policy)
    elif scheme == "file":
        data = _local_bytes(url, where, policy)
    else:
        raise MediaError(f"{where}: unsupported image URL {url[:40]!r}: use a data:image/...;base64, URL")
    return await asyncio.to_thread(decode, data, where, policy)  # a large image takes a while: not in the event loop


def decode(data: bytes, where: str, policy: MediaPolicy) -> UserImage:
    if len(data) > policy.max_bytes:
        raise MediaError(f"{where}: the image is {len(data)} bytes, more than this server's limit of "
                         f"{policy.max_bytes}: send a smaller image", 413)  # fmt: skip
    try:
        return UserImage.from_bytes(data, policy.max_pixels, name=where)
    except ImageError as error:
        if "decompression bomb" in error.cause:  # over ``max_pixels``: the first clause says by how much
            raise MediaError(f"{where}: {error.cause.split(';')[0]}: send a smaller image", 413) from error
        raise MediaError(str(error)) from error


def _data_url_bytes(url: str, where: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{where}: a data URL needs a comma before its payload: data:image/png;base64,<data>")
    media_type, *params = header[len("data:") :].split(";")
    if not media_type.lower().startswith("image/"):
        raise MediaError(f"{where}: the data URL holds {media_type or 'no media type'!r}, not an image "
                         "(data:image/png;base64,...)")  # fmt: skip
    if "base64" not in [p.lower() for p in params]:
        raise MediaError(f"{where}: only base64 data URLs are read (data:{media_type};base64,...)")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise MediaError(f"{where}: the image is more than this server's limit of {policy.max_bytes} bytes", 413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise MediaError(f"{where}: the data URL's payload is not valid base64 ({error})") from error


async def _remote_bytes(url: str, where: str, policy: MediaPolicy) -> bytes:
    deadline = time.monotonic() + policy.remote_timeout
    chunks, size = [], 0
    try:
        async with httpx.AsyncClient(timeout=policy.remote_timeout, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(f"{where}: fetching {url} answered HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise MediaError(f"{where}: {url} is more than this server's limit of {policy.max_bytes} "
                                         "bytes", 413)  # fmt: skip
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("the whole download took too long")
                    chunks.append(chunk)
    except httpx.TimeoutException as error:
        raise MediaError(f"{where}: fetching {url} took more than {policy.remote_timeout} s ({error})") from error
    except httpx.HTTPError as error:
        raise MediaError(f"{where}: cannot fetch {url} ({type(error).__name__}: {error})") from error
    return b"".join(chunks)


def _local_bytes(url: str, where: str, policy: MediaPolicy) -> bytes:
    if policy.local_root is None:
        raise MediaError(f"{where}: file:// image URLs are disabled on this server; send a data: URL, or start the "
                         "server with --allowed-local-media-path DIR")  # fmt: skip
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(f"{where}: a file:// URL must name a local path (file:///path/to/image.png)")
    path = Path(unquote(parsed.path)).resolve()
    root = policy.local_root.resolve()
    if not path.is_relative_to(root):
        raise MediaError(f"{where}: {path} is outside the allowed local media folder {root}")
    if not path.is_file():
        raise MediaError(f"{where}: {path} is not a file")
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"{where}: {path} is more than this server's limit of {policy.max_bytes} bytes", 413)
    return path.read_bytes()
