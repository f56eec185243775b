"""Who is asking: the API key the surface authenticated (None with auth off), the request's id for
the ledger, and the address the caller reaches the gateway at (for the URLs it is handed)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ApiError
from ..state import KeyRecord


@dataclass(frozen=True, slots=True)
class Caller:
    key: KeyRecord | None = None
    request_id: str | None = None
    base_url: str = ""

    @property
    def owner(self) -> str | None:
        """Who owns what this request makes or reads (tasks, artifacts): the key's id; None with auth off."""
        return self.key.id if self.key is not None else None

    def may_use(self, model_id: str) -> bool:
        return self.key is None or self.key.allows(model_id)

    def check_model(self, model_id: str) -> None:
        """403 when the caller's key has a model list and `model_id` is not on it."""
        if not self.may_use(model_id):
            raise ApiError(403, f"this API key may not use model '{model_id}'", param="model",
                           code="model_not_allowed")
