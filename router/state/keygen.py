"""API key secrets: made here, shown once, stored only as a sha256 hash."""

from __future__ import annotations

import base64
import hashlib
import secrets as _random

KEY_PREFIX = "ig_"
_SECRET_CHARS = 32  # url-safe characters after the prefix: 192 random bits
DISPLAY_CHARS = 8  # "ig_" + 5: tells keys apart in a listing, far too short to guess the rest


def new_secret() -> str:
    # token_urlsafe(24) is exactly 32 characters of [A-Za-z0-9_-].
    return KEY_PREFIX + _random.token_urlsafe(_SECRET_CHARS * 3 // 4)


def new_key_id() -> str:
    return "key_" + _random.token_hex(12)


def hash_secret(secret: str) -> str:
    """A plain sha256 is enough: the secret is 192 random bits, so there is nothing to brute-force
    that a slow hash would protect, and every request can look its key up by this value."""
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_key(secret: str) -> bool:
    return secret.startswith(KEY_PREFIX) and len(secret) == len(KEY_PREFIX) + _SECRET_CHARS


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: whsec_ and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(_random.token_bytes(32)).decode("ascii")
