"""What every artifact store does, wherever the bytes live: stored images (uploads, `url` results,
task results) for an owner, with an expiry, and URLs to them.

A store subclass keeps the bytes and the record (`_save`, `_load`, `_delete`, `sweep`, `ping`).
Ids, tenancy, expiry and the gateway's own signed URLs — HMAC-SHA256 over (id, expiry), so they
work without an API key until they expire and cannot be forged or extended — are decided here once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import ApiError

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


def storage_unavailable(what: str) -> ApiError:
    """A store that cannot be reached: the client may retry; the message names no credential."""
    return ApiError(503, f"artifact storage is unavailable: {what}", code="artifact_storage_unavailable",
                    retry_after=5)


class ArtifactStore(ABC):
    def __init__(self, ttl_hours: float, secret: bytes) -> None:
        self.ttl_s = int(ttl_hours * 3600)
        self._secret = secret

    # -- where the bytes live (each store's own)
    @abstractmethod
    async def _save(self, art: Artifact, data: bytes, by_content: bool) -> None: ...

    @abstractmethod
    async def _load(self, artifact_id: str) -> tuple[Artifact, bytes] | None: ...

    @abstractmethod
    async def _delete(self, artifact_id: str) -> None: ...

    @abstractmethod
    async def sweep(self) -> int:
        """Delete expired artifacts; returns how many went."""

    @abstractmethod
    async def ping(self) -> str | None:
        """None when the store can be written and read; else what is wrong, in words."""

    # -- the same for every store
    @staticmethod
    def valid_id(artifact_id: str) -> bool:
        return bool(_ID.match(artifact_id))

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
        await self._save(art, data, by_content)
        return art

    async def get(self, artifact_id: str, owner: str | None = None) -> tuple[Artifact, bytes] | None:
        """The artifact and its bytes; None when missing, expired, or (with `owner`, a key id) not
        that key's own. `owner` None reads any: auth off, or a signed URL."""
        if not self.valid_id(artifact_id):
            return None
        found = await self._load(artifact_id)
        if found is None:
            return None
        art, data = found
        if art.expires_at <= time.time():
            await self._delete(artifact_id)
            return None
        return (art, data) if owner is None or art.owner == owner else None

    # -- URLs
    def url(self, art: Artifact, base_url: str) -> str:
        """Where a client fetches the artifact without a key, until it expires."""
        return self.url_for(art.id, art.expires_at, base_url)

    def url_for(self, artifact_id: str, expires: int, base_url: str) -> str:
        return base_url + self.signed_path_for(artifact_id, expires)

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
