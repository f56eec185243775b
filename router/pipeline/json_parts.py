"""JSON answers that carry images' base64 as the bytes it arrived in.

An image's base64 is most of an answer (1.6 MB of a 1024x1024 PNG). It stays a `Base64Text`: a
view into the upstream's answer, or the bytes the gateway encoded. Rendering dumps the rest with
orjson around a marker per image and returns the pieces in order, so the body is written piece by
piece and the base64 is never copied into a Python str or a second body.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

Piece = bytes | memoryview


class Base64Text:
    """ASCII base64 of an image; JSON-rendered by `json_parts` as a string, without a copy."""

    __slots__ = ("data",)

    def __init__(self, data: Piece) -> None:
        self.data = data


def json_parts(content: Any) -> list[Piece]:
    """`content` as JSON: orjson's output cut where each Base64Text goes, the base64 between."""
    blobs: list[Piece] = []
    token = "b64-" + secrets.token_hex(8) + "-"  # not in any string of `content`: a random marker per render

    def default(value: Any) -> str:
        if isinstance(value, Base64Text):
            blobs.append(value.data)
            return f"{token}{len(blobs) - 1}"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    out = orjson.dumps(content, default=default)
    if not blobs:
        return [out]
    view, pieces, pos = memoryview(out), [], 0
    for index, blob in enumerate(blobs):  # orjson wrote the markers in the order it called `default`
        marker = f'"{token}{index}"'.encode()
        at = out.index(marker, pos)
        pieces += [view[pos:at + 1], blob]
        pos = at + len(marker) - 1  # keep the closing quote
    pieces.append(view[pos:])
    return pieces


def json_bytes(content: Any) -> bytes:
    """`content` as one JSON bytes object (Base64Text included): for small bodies and stored replays."""
    return b"".join(json_parts(content))
