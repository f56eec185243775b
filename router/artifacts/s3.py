"""Artifacts in an S3-compatible bucket (`artifacts.url: s3://bucket/prefix`), through obstore:
async, with presigning built in. One object per artifact, `<prefix>/<id>`; its record rides along
as the object's user metadata (`x-amz-meta-*`), so a put or a get is one request.

Expiry: `sweep` lists the prefix and deletes what has expired; a bucket lifecycle rule that
expires objects after the longest lifetime any surface promises (7 days) is a fine backstop
(README, "Artifacts in object storage"). Error messages name the bucket and the HTTP status,
never a credential: obstore's own text is not passed on.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store

from ..config import ArtifactsConfig
from .base import Artifact, ArtifactStore, storage_unavailable

if TYPE_CHECKING:
    from obstore.store import ClientConfig

log = logging.getLogger("imagegate")
PRESIGN_MAX_S = 7 * 86_400  # SigV4's limit on a presigned URL
_STATUS = re.compile(r"status code: (\d{3})")


def open_bucket(cfg: ArtifactsConfig) -> S3Store:
    bucket, prefix = cfg.bucket or ("", "")
    s3 = cfg.s3
    settings: dict[str, Any] = {"region": s3.region}
    if s3.endpoint:
        settings.update(endpoint=s3.endpoint, virtual_hosted_style_request=False)
    given = {"access_key_id": s3.access_key_id, "secret_access_key": s3.secret_access_key, "token": s3.session_token}
    settings.update({k: v for k, v in given.items() if v})  # empty: obstore reads AWS_* or an instance role
    client: ClientConfig = {"allow_http": s3.endpoint.startswith("http://"), "connect_timeout": "5s", "timeout": "60s"}
    return S3Store(bucket, prefix=prefix or None, client_options=client, **settings)


def explain(exc: BaseError, bucket: str) -> str:
    """What went wrong, in words that carry no credential (obstore's text holds URLs and debug dumps)."""
    found = _STATUS.search(str(exc))
    status = found[1] if found else ""
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in ("401", "403"):
        return f"bucket '{bucket}' refused the configured credentials ({status or 403})"
    if isinstance(exc, NotFoundError) or status == "404":
        return f"bucket '{bucket}' or an object in it was not found"
    if status:
        return f"bucket '{bucket}' answered HTTP {status}"
    return f"bucket '{bucket}' could not be reached ({type(exc).__name__})"


def _record(art: Artifact) -> dict[str, str]:
    return {"Content-Type": art.content_type, "owner": art.owner or "", "width": str(art.width),
            "height": str(art.height), "created_at": str(art.created_at), "expires_at": str(art.expires_at)}


def _artifact(artifact_id: str, size: int, attributes: dict[str, Any]) -> Artifact | None:
    try:
        return Artifact(id=artifact_id, bytes=size, width=int(attributes["width"]),
                        height=int(attributes["height"]), content_type=str(attributes["Content-Type"]),
                        created_at=int(attributes["created_at"]), expires_at=int(attributes["expires_at"]),
                        owner=str(attributes.get("owner") or "") or None)  # an empty value may not come back
    except (KeyError, ValueError):
        return None  # not one of ours


class S3Artifacts(ArtifactStore):
    def __init__(self, cfg: ArtifactsConfig, secret: bytes) -> None:
        super().__init__(cfg.ttl_hours, secret)
        self.bucket = (cfg.bucket or ("", ""))[0]
        self.presigned = cfg.url_results == "presigned"
        self.store = open_bucket(cfg)

    async def _save(self, art: Artifact, data: bytes, by_content: bool) -> None:
        # A content-addressed input is written again: S3 has no metadata-only update, and the
        # rewrite renews its expiry.
        try:
            await obstore.put_async(self.store, art.id, data, attributes=_record(art))
        except BaseError as exc:
            log.warning("artifact put failed: %s", explain(exc, self.bucket))
            raise storage_unavailable(explain(exc, self.bucket)) from None

    async def _load(self, artifact_id: str) -> tuple[Artifact, bytes] | None:
        try:
            result = await obstore.get_async(self.store, artifact_id)
            data = bytes(await result.bytes_async())
        except NotFoundError:
            return None
        except BaseError as exc:
            log.warning("artifact get failed: %s", explain(exc, self.bucket))
            raise storage_unavailable(explain(exc, self.bucket)) from None
        art = _artifact(artifact_id, len(data), dict(result.attributes))
        return None if art is None else (art, data)

    async def _delete(self, artifact_id: str) -> None:
        try:
            await obstore.delete_async(self.store, artifact_id)
        except BaseError as exc:  # expired anyway: the next sweep tries again
            log.warning("artifact delete failed: %s", explain(exc, self.bucket))

    async def sweep(self) -> int:
        """List the prefix; look closer only at objects old enough to have expired."""
        now, removed = time.time(), 0
        try:
            async for chunk in obstore.list(self.store, chunk_size=500):
                for meta in chunk:
                    name = str(meta["path"]).rsplit("/", 1)[-1]
                    if not self.valid_id(name) or meta["last_modified"].timestamp() + self.ttl_s > now:
                        continue
                    head = await obstore.get_async(self.store, name, options={"head": True})
                    art = _artifact(name, 0, dict(head.attributes))
                    if art is not None and art.expires_at <= now:
                        await self._delete(name)
                        removed += 1
        except BaseError as exc:
            log.warning("artifact sweep stopped: %s", explain(exc, self.bucket))
        return removed

    async def ping(self) -> str | None:
        try:  # a listing of a prefix that holds nothing: cheap, and refused without our rights
            await obstore.list_with_delimiter_async(self.store, ".readyz/")
        except BaseError as exc:
            return explain(exc, self.bucket)
        return None

    def url_for(self, artifact_id: str, expires: int, base_url: str) -> str:
        if not self.presigned:
            return super().url_for(artifact_id, expires, base_url)
        valid_s = max(1, min(expires - int(time.time()), PRESIGN_MAX_S))
        return str(obstore.sign(self.store, "GET", artifact_id, timedelta(seconds=valid_s)))
