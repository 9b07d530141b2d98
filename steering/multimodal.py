"""Images in prompts: where they may come from, how they are checked, and how they sit in a token sequence.

An image arrives as a URL. A ``data:`` URL (``data:image/png;base64,...``) is always accepted; a ``file:`` URL or
a plain path only inside a directory the operator allowed (:attr:`ImageLimits.allowed_dirs`); anything else,
``http(s)`` included, is refused: the server never fetches from the network. Every image is checked before any
model work: its count per request, its encoded size, its format (the decoder's own word, not the URL's), its
pixel count (read from the header, before decoding), and that it decodes at all. Each failure is an
:class:`~steering.errors.InvalidRequestError` naming the field.

A :class:`PromptImage` is one image placed in a prompt: the image processor's tensors for it, the absolute
positions of the tokens its features take the place of, and the layout of those tokens (rows x columns in the
model's own order), which is what a client needs to draw an attribution heatmap over the picture. A request
carries them beside its token ids (:attr:`steering.engine.types.GenerationRequest.images`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steering.errors import InvalidRequestError

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    """What a request's images may be. Each bound is a server setting."""

    max_images: int = 8
    """Images in one request."""
    max_bytes: int = 20 * 2**20
    """Encoded bytes of one image (after base64 decoding)."""
    max_pixels: int = 4096 * 4096
    """Width x height of one image, read from its header before it is decoded."""
    formats: frozenset[str] = DEFAULT_FORMATS
    """Pillow format names accepted."""
    allowed_dirs: tuple[Path, ...] = ()
    """Directories whose files may be named (``file:`` URLs or paths); none by default."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image (RGB) and where it came from."""

    image: Any
    """A ``PIL.Image.Image`` in RGB."""
    digest: str
    """SHA-256 of its encoded bytes: the identity of the image (caches, the prefix-cache salt)."""
    source: str
    """``data`` or the file's path."""

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.image.size
        return int(w), int(h)


def _decode_data_url(url: str, param: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise InvalidRequestError("an image data URL must look like data:image/png;base64,...", param=param)
    payload = url[m.end():]
    if not m.group("b64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"the image's base64 data does not decode: {exc}", param=param) from exc


def _read_file(ref: str, limits: ImageLimits, param: str) -> tuple[bytes, str]:
    path_text = urllib.parse.unquote(urllib.parse.urlparse(ref).path) if ref.startswith("file:") else ref
    if not limits.allowed_dirs:
        raise InvalidRequestError("images must be data: URLs (data:image/png;base64,...); this server reads no "
                                  "image files", param=param)
    path = Path(path_text).expanduser()
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidRequestError(f"no image file {path_text!r}", param=param) from None
    if not any(real.is_relative_to(d.resolve()) for d in limits.allowed_dirs):
        raise InvalidRequestError(f"{path_text!r} is not inside a directory this server reads images from",
                                  param=param)
    if not real.is_file():
        raise InvalidRequestError(f"{path_text!r} is not a file", param=param)
    if real.stat().st_size > limits.max_bytes:
        raise InvalidRequestError(f"the image file has {real.stat().st_size} bytes; at most {limits.max_bytes}",
                                  param=param)
    return real.read_bytes(), str(real)


def load_image(url: str, limits: ImageLimits, param: str = "image") -> LoadedImage:
    """Read, check and decode one image (see the module's docstring for what is accepted)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url:
        raise InvalidRequestError("an image URL must be a non-empty string", param=param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data, source = _decode_data_url(url, param), "data"
    elif scheme in ("http", "https", "ftp", "ws", "wss"):
        raise InvalidRequestError(f"{scheme} image URLs are not fetched: this server makes no network requests; "
                                  "send the image inline as a data: URL (data:image/png;base64,...)", param=param)
    elif scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":/", ":\\")):
        data, source = _read_file(url, limits, param)
    else:
        raise InvalidRequestError(f"unsupported image URL scheme {scheme!r}; send a data: URL", param=param)
    if not data:
        raise InvalidRequestError("the image is empty", param=param)
    if len(data) > limits.max_bytes:
        raise InvalidRequestError(f"the image has {len(data)} bytes; at most {limits.max_bytes}", param=param)
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            fmt, (w, h) = probe.format, probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"the image cannot be decoded: {exc}", param=param) from exc
    if fmt not in limits.formats:
        raise InvalidRequestError(f"image format {fmt} is not accepted; use one of {', '.join(sorted(limits.formats))}",
                                  param=param)
    if w * h > limits.max_pixels:
        raise InvalidRequestError(f"the image has {w}x{h} = {w * h} pixels; at most {limits.max_pixels}", param=param)
    if w < 1 or h < 1:
        raise InvalidRequestError("the image has no pixels", param=param)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"the image cannot be decoded: {exc}", param=param) from exc
    return LoadedImage(rgb, hashlib.sha256(data).hexdigest(), source)


def load_images(urls: Sequence[str], limits: ImageLimits, params: Sequence[str]) -> list[LoadedImage]:
    """Every image of a request, its count checked first."""
    if len(urls) > limits.max_images:
        raise InvalidRequestError(f"{len(urls)} images in one request; at most {limits.max_images}",
                                  param=params[limits.max_images] if len(params) > limits.max_images else None)
    return [load_image(u, limits, p) for u, p in zip(urls, params, strict=True)]


@dataclass(frozen=True)
class PromptImage:
    """One image in a prompt."""

    tensors: Mapping[str, Any] = field(repr=False, compare=False)
    """The image processor's outputs for this image alone (``pixel_values``, ``image_grid_thw``, ...), on CPU."""
    positions: tuple[int, ...]
    """Absolute positions of the tokens its features replace, in order."""
    grid: tuple[int, int]
    """Rows and columns of those tokens in the model's layout: ``positions[i]`` is row ``i // cols``, column
    ``i % cols`` (rows x cols == len(positions))."""
    digest: str
    size: tuple[int, int] = (0, 0)
    """The image's width and height in pixels."""

    def shifted(self, offset: int) -> PromptImage:
        """The same image with its positions moved by ``offset`` (packing several segments in one row)."""
        return PromptImage(self.tensors, tuple(p + offset for p in self.positions), self.grid, self.digest,
                           self.size)


def image_positions(images: Sequence[PromptImage]) -> list[int]:
    """Every image token's position, in order."""
    return [p for im in images for p in im.positions]


def load_message_images(messages: Sequence[Mapping[str, Any]], limits: ImageLimits) -> list[dict[str, Any]]:
    """Chat messages with every ``{"type": "image_url", "url", "param"}`` part loaded and checked (see
    :func:`load_image`) into ``{"type": "image", "image": LoadedImage}``; the count is checked first."""
    refs = [part for m in messages if isinstance(m.get("content"), list)
            for part in m["content"] if part.get("type") == "image_url"]
    if not refs:
        return [dict(m) for m in messages]
    loaded = iter(load_images([p["url"] for p in refs], limits, [p.get("param") or "image" for p in refs]))
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "image": next(loaded)} if part.get("type") == "image_url" else part
                       for part in content]
        out.append({**m, "content": content})
    return out


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text (its text parts joined)."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""
