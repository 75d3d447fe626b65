"""The admin token check, the same for the HTTP face (the ``Authorization`` header) and the
gRPC face (the ``authorization`` metadata key)."""

from __future__ import annotations

import hmac

from multiserve.errors import Unauthorized

NEEDS_TOKEN = "this endpoint needs 'Authorization: Bearer <admin token>'"


def require_admin(authorization: str | None, admin_token: str) -> None:
    """Raise `Unauthorized` unless ``authorization`` is ``Bearer <admin token>`` (compared in
    constant time)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), admin_token.encode()
    ):
        raise Unauthorized(NEEDS_TOKEN)
