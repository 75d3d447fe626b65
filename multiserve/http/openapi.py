"""The OpenAPI 3.1 description of every route, served at ``GET /openapi.json``.

Written out by hand rather than derived, so that it states the contract (every status a route
can answer, and its body) instead of restating the code; a test checks the server against it.
"""

from __future__ import annotations

from typing import Any

from multiserve import __version__

JSON = "application/json"
NPY = "application/x-npy"

_NAME = {"type": "string", "minLength": 1, "maxLength": 128}
_VERSION = {
    "type": "string",
    "minLength": 1,
    "description": "A version number, `latest`, or a label such as `stable`.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int, v2: bool = False) -> dict[str, Any]:
    schema = _ref("V2Error") if v2 else _ref("Error")
    text = {
        400: "Malformed request or invalid inputs.",
        401: "Missing or wrong admin token.",
        404: "Unknown model, version, label or route.",
        405: "Method not allowed on this route.",
        406: "An .npy response was asked for a model with several outputs.",
        409: "The version is pinned.",
        413: "The body is over max_request_bytes.",
        415: "Unsupported content type.",
        500: "The model raised while predicting (it keeps serving), or the state file could "
        "not be written.",
        503: "The version failed to load, is still settling, or the server is not ready.",
        507: "The model does not fit the cache's budget.",
    }
    return {str(status): _json(schema, text[status]) for status in statuses}


_LABEL = {
    "type": "string",
    "pattern": r"^(?!(latest|predict|labels|[0-9]+)$)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
    "description": "A label: the model-name rule, not all digits, not latest or predict.",
}


def _path_params(*names: str) -> list[dict[str, Any]]:
    schemas = {"name": _NAME, "version": _VERSION, "label": _LABEL}
    return [{"name": n, "in": "path", "required": True, "schema": schemas[n]} for n in names]


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    params: tuple[str, ...] = (),
    body: dict[str, Any] | None = None,
    admin: bool = False,
    tags: tuple[str, ...] = (),
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses, "tags": list(tags)}
    if params:
        operation["parameters"] = _path_params(*params)
    if body is not None:
        operation["requestBody"] = body
    if admin:
        operation["security"] = [{"adminToken": []}]
    return operation


_TENSOR_SPEC = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "dtype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
# How a loaded version's memory cost was obtained (GET /admin/cache, a version's description).
_MEMORY_COST = {
    "type": "object",
    "required": ["bytes", "method", "measured_bytes", "reported_bytes"],
    "properties": {
        "bytes": {"type": "integer"},
        "method": {"enum": ["measured", "reported"]},
        "measured_bytes": {"type": ["integer", "null"]},
        "reported_bytes": {"type": "integer"},
    },
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_DERIVED = {
    "type": "object",
    "description": "A model derived by `optimize` / `export` in the version's config.toml and "
    "checked against the original before it may serve. `accepted`: it serves (for an export "
    "followed by an optimisation, the optimised model serves if it is accepted). `speedup` is "
    "over the version as published; errors and agreement are against the step's source.",
    "required": ["kind", "accepted", "reason", "speedup", "max_abs_error", "argmax_agreement"],
    "properties": {
        "kind": {"enum": ["graph", "int8", "onnx"]},
        "accepted": {"type": "boolean"},
        "reason": {"type": "string"},
        "speedup": _NUMBER_OR_NULL,
        "max_abs_error": _NUMBER_OR_NULL,
        "max_rel_error": _NUMBER_OR_NULL,
        "argmax_agreement": _NUMBER_OR_NULL,
        "source_bytes": {"type": "integer"},
        "optimized_bytes": {"type": ["integer", "null"]},
        "backend": {"type": ["string", "null"]},
        "sample": {"type": ["string", "null"]},
        "rows": {"type": ["integer", "null"]},
        "seconds_per_call": {"type": "object"},
        "load_seconds": {"type": "object"},
        "build_seconds": _NUMBER_OR_NULL,
        "reused": {"type": "boolean"},
    },
}
_VERSION_DESCRIPTION = {
    "type": "object",
    "required": ["name", "version", "state", "backend", "artifact", "pinned", "labels"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "string"},
        "state": {"enum": ["settling", "available", "loading", "ready", "failed"]},
        "backend": {"type": ["string", "null"]},
        "artifact": {"type": ["string", "null"]},
        "pinned": {"type": "boolean"},
        "labels": {"type": "array", "items": {"type": "string"}},
        "error": {"type": "string"},
        "memory_bytes": {"type": "integer"},
        "memory": _MEMORY_COST,
        "load_seconds": {"type": "number"},
        "inputs": {"type": "array", "items": _ref("TensorSpec")},
        "outputs": {"type": "array", "items": _ref("TensorSpec")},
        "optimized": _ref("DerivedModel"),
        "exported": _ref("DerivedModel"),
    },
}
_MODEL_DESCRIPTION = {
    "type": "object",
    "required": ["name", "latest", "labels", "versions"],
    "properties": {
        "name": {"type": "string"},
        "latest": {"type": ["string", "null"]},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "versions": {"type": "array", "items": _ref("VersionDescription")},
    },
}
_PREDICT_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {
            "description": "Named tensors as nested lists, or one bare nested list for a "
            "single-input model.",
            "oneOf": [{"type": "object"}, {"type": "array"}, {"type": "number"}],
        }
    },
}
_PREDICT_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "outputs": {"type": "object"},
    },
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
_V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_V2_TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
_V2_MODEL_METADATA = {
    "type": "object",
    "required": ["name", "versions", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
        "outputs": {"type": "array", "items": _ref("V2TensorMetadata")},
    },
}
_V2_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {
                        "enum": [
                            "BOOL",
                            "UINT8",
                            "UINT16",
                            "UINT32",
                            "UINT64",
                            "INT8",
                            "INT16",
                            "INT32",
                            "INT64",
                            "FP16",
                            "FP32",
                            "FP64",
                            "BYTES",
                        ]
                    },
                    "parameters": {"type": "object"},
                    "data": {},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}
_V2_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "datatype": {"type": "string"},
                    "parameters": {"type": "object"},
                    "data": {"type": "array"},
                },
            },
        },
    },
}
_CACHE_REPORT = {
    "type": "object",
    "required": ["entries", "totals", "budget", "pins", "stats"],
    "properties": {
        "entries": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "version",
                    "memory_bytes",
                    "pinned",
                    "last_used",
                    "loaded_at",
                    "in_flight",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "memory_bytes": {"type": "integer"},
                    "pinned": {"type": "boolean"},
                    "last_used": {"type": "number"},
                    "loaded_at": {"type": "number"},
                    "in_flight": {"type": "integer"},
                    "memory": _MEMORY_COST,
                },
            },
        },
        "totals": {"type": "object"},
        "budget": {"type": "object"},
        "pins": {"type": "array"},
        "stats": {"type": "object"},
    },
}
_LABELS = {
    "type": "object",
    "required": ["name", "labels"],
    "properties": {
        "name": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def ok_json(schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {"200": _json(schema, text)}


def _predict() -> dict[str, Any]:
    operation = _operation(
        "Predict with a model version.",
        {
            "200": {
                "description": "The outputs, as JSON, or as .npy when the request accepts "
                "application/x-npy. A Python predictor answers whatever its predict returns "
                "(JSON, bytes, or a Response with its own status, headers and media type).",
                "content": {
                    JSON: {"schema": _ref("PredictResponse")},
                    NPY: {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(400, 404, 406, 413, 415, 500, 503, 507),
        },
        params=("name", "version"),
        body={
            "required": True,
            "description": "Tensors as JSON or .npy. A Python predictor takes any body: the "
            "decoded JSON for application/json, the raw bytes for any other content type "
            "(which a tensor model refuses with 415).",
            "content": {
                JSON: {"schema": _ref("PredictRequest")},
                NPY: {"schema": {"type": "string", "format": "binary"}},
            },
        },
        tags=("predict",),
    )
    operation["responses"]["503"]["description"] += (
        " Or a Python predictor's process died while answering, or restarts after repeated "
        "crashes (Retry-After)."
    )
    return operation


def _infer() -> dict[str, Any]:
    return _operation(
        "Open Inference Protocol inference (JSON, or JSON plus binary tensors).",
        {
            "200": {
                "description": "The outputs; application/octet-stream with an "
                "Inference-Header-Content-Length header when binary outputs follow the JSON.",
                "content": {
                    JSON: {"schema": _ref("V2InferResponse")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(400, 404, 413, 500, 503, 507, v2=True),
        },
        params=("name", "version"),
        body={"required": True, "content": {JSON: {"schema": _ref("V2InferRequest")}}},
        tags=("v2",),
    )


def _without_version(operation: dict[str, Any]) -> dict[str, Any]:
    params = [p for p in operation.get("parameters", []) if p["name"] != "version"]
    return {**operation, "parameters": params}


def _monitoring_paths() -> dict[str, Any]:
    """The dashboard, its status document, drift, and Triton's configuration and statistics."""
    html = {
        "200": {
            "description": "The dashboard: one self-contained page that polls /status.",
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    }
    return {
        "/": {"get": _operation("The dashboard.", html, tags=("monitoring",))},
        "/dashboard": {"get": _operation("The dashboard.", html, tags=("monitoring",))},
        "/status": {
            "get": _operation(
                "Models, versions, states, pins, labels, the cache against its budgets, "
                "per-model traffic over the last minutes, recent events, drift, and the "
                "repository's health (what the dashboard shows).",
                ok_json(
                    {
                        "type": "object",
                        "required": ["server", "repository", "cache", "models", "traffic"],
                    },
                    "The status.",
                ),
                tags=("monitoring",),
            )
        },
        "/models/{name}/{version}/monitor": {
            "get": _operation(
                "A version's input drift: reference, window, PSI and KS per input feature, "
                "the worst features, and whether it is drifting (null when not loaded).",
                {
                    "200": _json(
                        {"type": "object", "required": ["name", "version", "monitor"]},
                        "The version's drift statistics.",
                    ),
                    **_errors(404, 503),
                },
                params=("name", "version"),
                tags=("monitoring",),
            )
        },
        "/v2/models/stats": {
            "get": _operation(
                "Inference statistics of every model (Triton's statistics extension).",
                ok_json({"type": "object", "required": ["model_stats"]}, "The statistics."),
                tags=("v2",),
            )
        },
        "/v2/models/{name}/versions/{version}/config": {
            "get": _operation(
                "The model's configuration (Triton's model configuration extension; loads "
                "the version if needed).",
                {
                    "200": _json({"type": "object", "required": ["name"]}, "The configuration."),
                    **_errors(404, 503, 507, v2=True),
                },
                params=("name", "version"),
                tags=("v2",),
            )
        },
        "/v2/models/{name}/versions/{version}/stats": {
            "get": _operation(
                "Inference statistics of a version (Triton's statistics extension).",
                {
                    "200": _json({"type": "object", "required": ["model_stats"]}, "Statistics."),
                    **_errors(404, 503, v2=True),
                },
                params=("name", "version"),
                tags=("v2",),
            )
        },
    }


def build() -> dict[str, Any]:
    """The whole document."""
    admin_version = ("name", "version")
    paths: dict[str, Any] = {
        "/healthz": {
            "get": _operation(
                "Liveness probe: the process is up.",
                ok_json({"type": "object", "required": ["status"]}, "Alive."),
                tags=("probes",),
            )
        },
        "/readyz": {
            "get": _operation(
                "Readiness probe: the repository is scanned and the server can serve.",
                {
                    "200": _json({"type": "object", "required": ["status"]}, "Ready."),
                    "503": _json({"type": "object", "required": ["status"]}, "Not ready, why."),
                },
                tags=("probes",),
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics.",
                {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                tags=("probes",),
            )
        },
        "/openapi.json": {
            "get": _operation("This document.", ok_json({"type": "object"}, "OpenAPI 3.1."))
        },
        "/models": {
            "get": _operation(
                "Every model with its versions, their states, and latest.",
                ok_json(
                    {
                        "type": "object",
                        "required": ["models"],
                        "properties": {
                            "models": {"type": "array", "items": _ref("ModelDescription")}
                        },
                    },
                    "The models.",
                ),
                tags=("models",),
            )
        },
        "/models/{name}": {
            "get": _operation(
                "One model: latest, labels, and each version's state.",
                {"200": _json(_ref("ModelDescription"), "The model."), **_errors(404)},
                params=("name",),
                tags=("models",),
            )
        },
        "/models/{name}/{version}": {
            "get": _operation(
                "A version's metadata (loads it if needed).",
                {
                    "200": _json(_ref("VersionDescription"), "The version."),
                    **_errors(404, 405, 503, 507),
                },
                params=("name", "version"),
                tags=("models",),
            )
        },
        "/models/{name}/predict": {"post": _without_version(_predict())},
        "/models/{name}/{version}/predict": {"post": _predict()},
        "/admin/cache": {
            "get": _operation(
                "The loaded models, totals, budget and counters.",
                {"200": _json(_ref("CacheReport"), "The cache."), **_errors(401)},
                admin=True,
                tags=("admin",),
            )
        },
        "/admin/models/{name}/{version}/load": {
            "post": _operation(
                "Load a version now; answers when it is ready or failed.",
                {
                    "200": _json(_ref("VersionDescription"), "Loaded."),
                    **_errors(401, 404, 503, 507),
                },
                params=admin_version,
                admin=True,
                tags=("admin",),
            )
        },
        "/admin/models/{name}/{version}/evict": {
            "post": _operation(
                "Evict a version (it drains, then closes).",
                {
                    "200": _json(_ref("VersionDescription"), "Evicted, or was not loaded."),
                    **_errors(401, 404, 409, 503),
                },
                params=admin_version,
                admin=True,
                tags=("admin",),
            )
        },
        "/admin/models/{name}/{version}/pin": {
            "post": _operation(
                "Pin a version: load it if needed and exempt it from eviction.",
                {
                    "200": _json(_ref("VersionDescription"), "Pinned."),
                    **_errors(401, 404, 500, 503, 507),
                },
                params=admin_version,
                admin=True,
                tags=("admin",),
            ),
            "delete": _operation(
                "Unpin a version.",
                {
                    "200": _json(_ref("VersionDescription"), "Unpinned."),
                    **_errors(401, 404, 500, 503),
                },
                params=admin_version,
                admin=True,
                tags=("admin",),
            ),
        },
        "/admin/models/{name}/labels/{label}": {
            "put": _operation(
                "Point a label at a version.",
                {
                    "200": _json(_ref("Labels"), "The model's labels."),
                    **_errors(400, 401, 404, 500),
                },
                params=("name", "label"),
                body={
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["version"],
                                "properties": {"version": {"type": ["string", "integer"]}},
                            }
                        }
                    },
                },
                admin=True,
                tags=("admin",),
            ),
            "delete": _operation(
                "Remove a label.",
                {"200": _json(_ref("Labels"), "The model's labels."), **_errors(401, 404, 500)},
                params=("name", "label"),
                admin=True,
                tags=("admin",),
            ),
        },
        "/v2": {
            "get": _operation(
                "Server metadata.",
                ok_json(
                    {"type": "object", "required": ["name", "version", "extensions"]}, "Metadata."
                ),
                tags=("v2",),
            )
        },
        "/v2/health/live": {
            "get": _operation(
                "Server liveness.",
                ok_json({"type": "object", "required": ["live"]}, "Live."),
                tags=("v2",),
            )
        },
        "/v2/health/ready": {
            "get": _operation(
                "Server readiness.",
                {
                    "200": _json({"type": "object", "required": ["ready"]}, "Ready."),
                    "503": _json({"type": "object", "required": ["ready"]}, "Not ready."),
                },
                tags=("v2",),
            )
        },
        "/v2/models/{name}/versions/{version}": {
            "get": _operation(
                "Model metadata (loads the version if needed).",
                {
                    "200": _json(_ref("V2ModelMetadata"), "Metadata."),
                    **_errors(404, 503, 507, v2=True),
                },
                params=("name", "version"),
                tags=("v2",),
            )
        },
        "/v2/models/{name}/versions/{version}/ready": {
            "get": _operation(
                "Model readiness: 200 when a request would be served.",
                {
                    "200": _json({"type": "object", "required": ["name", "ready"]}, "Ready."),
                    **_errors(400, 404, v2=True),
                },
                params=("name", "version"),
                tags=("v2",),
            )
        },
        "/v2/models/{name}/versions/{version}/infer": {"post": _infer()},
        "/v2/repository/index": {
            "post": _operation(
                "Every version and its state.",
                {
                    "200": _json(
                        {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "version", "state", "reason"],
                            },
                        },
                        "The index.",
                    ),
                    **_errors(400, 401, v2=True),
                },
                body={
                    "required": False,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {"ready": {"type": "boolean"}},
                            }
                        }
                    },
                },
                admin=True,
                tags=("v2",),
            )
        },
        "/v2/repository/models/{name}/load": {
            "post": _operation(
                "Load the model's latest version.",
                {
                    "200": _json({"type": "object"}, "Loaded."),
                    **_errors(401, 404, 503, 507, v2=True),
                },
                params=("name",),
                admin=True,
                tags=("v2",),
            )
        },
        "/v2/repository/models/{name}/unload": {
            "post": _operation(
                "Unload every loaded version of the model (each drains first).",
                {"200": _json({"type": "object"}, "Unloaded."), **_errors(401, 404, 409, v2=True)},
                params=("name",),
                admin=True,
                tags=("v2",),
            )
        },
    }
    paths.update(_monitoring_paths())
    versioned = ("/v2/models/{name}/versions/{version}", "/ready", "/infer", "/config", "/stats")
    paths["/v2/models/{name}"] = {"get": _without_version(paths[versioned[0]]["get"])}
    for suffix in versioned[1:]:
        for method, operation in paths[versioned[0] + suffix].items():
            paths["/v2/models/{name}" + suffix] = {method: _without_version(operation)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "multiserve",
            "version": __version__,
            "description": "A multi-model, hot-swapping inference server. Native routes, the "
            "admin API (bearer token), and the Open Inference Protocol (KServe V2).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR,
                "V2Error": _V2_ERROR,
                "TensorSpec": _TENSOR_SPEC,
                "DerivedModel": _DERIVED,
                "VersionDescription": _VERSION_DESCRIPTION,
                "ModelDescription": _MODEL_DESCRIPTION,
                "PredictRequest": _PREDICT_REQUEST,
                "PredictResponse": _PREDICT_RESPONSE,
                "CacheReport": _CACHE_REPORT,
                "Labels": _LABELS,
                "V2TensorMetadata": _V2_TENSOR_METADATA,
                "V2ModelMetadata": _V2_MODEL_METADATA,
                "V2InferRequest": _V2_INFER_REQUEST,
                "V2InferResponse": _V2_INFER_RESPONSE,
            },
        },
    }
