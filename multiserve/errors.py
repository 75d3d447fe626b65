"""Every error a client can see. Each class carries its HTTP status and a stable code; the HTTP
layer only maps them to ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations


class MultiserveError(Exception):
    status_code = 500
    code = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedRequest(MultiserveError):
    status_code = 400
    code = "malformed_request"


class InvalidInput(MultiserveError):
    status_code = 400
    code = "invalid_input"


class Unauthorized(MultiserveError):
    status_code = 401
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class NotFound(MultiserveError):
    status_code = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class MethodNotAllowed(MultiserveError):
    status_code = 405
    code = "method_not_allowed"


class NotAcceptable(MultiserveError):
    status_code = 406
    code = "not_acceptable"


class Conflict(MultiserveError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(MultiserveError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(MultiserveError):
    status_code = 415
    code = "unsupported_media_type"


class PredictionFailed(MultiserveError):
    """The backend raised while predicting; the model stays loaded and keeps serving."""

    status_code = 500
    code = "prediction_failed"


class ModelUnavailable(MultiserveError):
    """The model is loaded but cannot answer now: its process died while answering, or is
    restarting after repeated crashes. Only that model's requests get it; retrying later works."""

    status_code = 503
    code = "model_unavailable"
    headers = {"Retry-After": "1"}


class TensorsNotServed(MultiserveError):
    """A tensor request (V2 inference, a pipeline's ``models.predict``) for a model that
    answers payloads (a Python predictor)."""

    status_code = 400
    code = "payload_model"


class ModelLoadFailed(MultiserveError):
    status_code = 503
    code = "model_load_failed"


class DownloadFailed(ModelLoadFailed):
    """Fetching a version from its bucket failed: transient, so the next request retries."""

    code = "download_failed"


class VersionGone(ModelLoadFailed):
    """The version's files left the repository before it loaded: the catalog is stale. The
    lifecycle rescans and answers as the repository now stands (usually 404)."""

    code = "version_gone"


class BackendNotInstalled(ModelLoadFailed):
    code = "backend_not_installed"


class VersionSettling(MultiserveError):
    """The version's files are still being written; it is not a model yet."""

    status_code = 503
    code = "version_settling"
    headers = {"Retry-After": "1"}


class ModelTooLarge(MultiserveError):
    """Loading the model would break the memory or count budget even after evicting every
    unpinned model; nothing is evicted for it."""

    status_code = 507
    code = "insufficient_memory"


class CacheThrashing(MultiserveError):
    """The model kept being evicted before a request could use it: the cache is too small."""

    status_code = 503
    code = "cache_thrashing"
    headers = {"Retry-After": "1"}


class StateNotSaved(MultiserveError):
    status_code = 500
    code = "state_not_saved"


class NotReady(MultiserveError):
    status_code = 503
    code = "not_ready"


class SettingsError(Exception):
    """An invalid setting. The message names the key and what is allowed."""
