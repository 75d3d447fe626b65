"""The HTTP face of a ModelServer (starlette)."""

from multiserve.http.app import create_app

__all__ = ["create_app"]
