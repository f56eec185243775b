"""Stored images (uploads and `response_format: url` results) and their signed, expiring URLs.

Bytes live in files under `artifacts.dir`; a small JSON file beside each holds its metadata.
URLs are signed with HMAC-SHA256 over (id, expiry), so they work without an API key until
they expire, and cannot be forged or extended.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio.to_thread
import orjson

_ID = re.compile(r"^art_[A-Za-z0-9]{24}$")


@dataclass(slots=True)
class Artifact:
    id: str
    bytes: int
    width: int
    height: int
    content_type: str
    created_at: int
    expires_at: int
    owner: str | None = None

    def public(self) -> dict[str, object]:
        return {"id": self.id, "object": "artifact", "bytes": self.bytes, "width": self.width,
                "height": self.height, "content_type": self.content_type, "created_at": self.created_at,
                "expires_at": self.expires_at}


def load_or_create_secret(configured: str, directory: Path) -> bytes:
    """The configured signing secret, else one generated once and kept beside the artifacts."""
    if configured:
        return configured.encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".signing_secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        value = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        return value


class ArtifactStore:
    def __init__(self, directory: str | Path, ttl_hours: float, secret: bytes) -> None:
        self.dir = Path(directory)
        self.ttl_s = int(ttl_hours * 3600)
        self._secret = secret
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def valid_id(artifact_id: str) -> bool:
        return bool(_ID.match(artifact_id))

    def _paths(self, artifact_id: str) -> tuple[Path, Path]:
        return self.dir / f"{artifact_id}.bin", self.dir / f"{artifact_id}.json"

    def _write(self, art: Artifact, data: bytes) -> None:
        blob, meta = self._paths(art.id)
        if not blob.exists():  # an input stored by content already has its bytes: renew its metadata only
            blob.write_bytes(data)
        meta.write_bytes(orjson.dumps(asdict(art)))

    async def put(self, data: bytes, *, content_type: str, width: int, height: int, owner: str | None = None,
                  by_content: bool = False, ttl_s: int | None = None) -> Artifact:
        """Store `data` for `owner`. `by_content`: the id is derived from the owner and the bytes, so
        the same input given twice is stored once (its expiry is renewed). `ttl_s`: other than the
        configured lifetime (longer only: a URL a surface promises for 7 days)."""
        now = int(time.time())
        if by_content:
            digest = hashlib.sha256(f"{owner or '-'}\0".encode() + data).hexdigest()
            artifact_id = "art_" + digest[:24]
        else:
            artifact_id = "art_" + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")[:24]
        art = Artifact(id=artifact_id, bytes=len(data), width=width, height=height, content_type=content_type,
                       created_at=now, expires_at=now + max(self.ttl_s, ttl_s or 0), owner=owner)
        await anyio.to_thread.run_sync(self._write, art, data)
        return art

    def _read_meta(self, artifact_id: str) -> Artifact | None:
        if not self.valid_id(artifact_id):
            return None
        try:
            art = Artifact(**orjson.loads(self._paths(artifact_id)[1].read_bytes()))
        except (FileNotFoundError, orjson.JSONDecodeError, TypeError):
            return None
        if art.expires_at <= time.time():
            self._delete(artifact_id)
            return None
        return art

    async def get(self, artifact_id: str, owner: str | None = None) -> tuple[Artifact, bytes] | None:
        """The artifact and its bytes; None when missing, expired, or (with `owner`, a key id) not
        that key's own. `owner` None reads any: auth off, or a signed URL."""
        def read() -> tuple[Artifact, bytes] | None:
            art = self._read_meta(artifact_id)
            if art is None or (owner is not None and art.owner != owner):
                return None
            try:
                return art, self._paths(artifact_id)[0].read_bytes()
            except FileNotFoundError:
                return None

        return await anyio.to_thread.run_sync(read)

    def _delete(self, artifact_id: str) -> None:
        for path in self._paths(artifact_id):
            path.unlink(missing_ok=True)

    def sweep(self) -> int:
        """Delete expired artifacts; returns how many went."""
        removed = 0
        for meta in self.dir.glob("art_*.json"):
            if self._read_meta(meta.stem) is None:
                removed += 1
        return removed

    def _signature(self, artifact_id: str, expires: int) -> str:
        return hmac.new(self._secret, f"{artifact_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def signed_path(self, art: Artifact) -> str:
        return self.signed_path_for(art.id, art.expires_at)

    def signed_path_for(self, artifact_id: str, expires: int) -> str:
        signature = self._signature(artifact_id, expires)
        return f"/v1/artifacts/{artifact_id}/content?expires={expires}&signature={signature}"

    def check_signature(self, artifact_id: str, expires: str, signature: str) -> bool:
        if not expires.isdigit() or int(expires) <= time.time():
            return False
        return hmac.compare_digest(self._signature(artifact_id, int(expires)), signature)
