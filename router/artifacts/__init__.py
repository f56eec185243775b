"""Stored images — uploads, `url` results, task results — and their expiring URLs: in a local
directory (local.py) or an S3-compatible bucket (s3.py), behind one interface (base.py)."""

from __future__ import annotations

from ..config import ArtifactsConfig
from .base import Artifact, ArtifactStore, storage_unavailable
from .local import LocalArtifacts, load_or_create_secret

__all__ = ["Artifact", "ArtifactStore", "LocalArtifacts", "load_or_create_secret", "open_artifacts",
           "storage_unavailable"]


def open_artifacts(cfg: ArtifactsConfig, secret: bytes) -> ArtifactStore:
    if cfg.bucket is None:
        return LocalArtifacts(cfg.dir, cfg.ttl_hours, secret)
    from .s3 import S3Artifacts  # obstore only when a bucket is configured

    return S3Artifacts(cfg, secret)
