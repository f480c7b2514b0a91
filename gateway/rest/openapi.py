"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Kept true by tests/test_openapi.py: validated with openapi-spec-validator, and exercised against
a running server by schemathesis (no 5xx, every response matching its schema).
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.core.errors import ErrorCode

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


_ERRORS = {
    "default": _json(
        _ref("ErrorBody"),
        "An error, with a stable code from the error table: "
        + ", ".join(f"{e.code} ({e.http_status})" for e in ErrorCode),
    )
}

_IMAGE_CONTENT: dict[str, Any] = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}
_IMAGE_BODY = {"required": True, "content": _IMAGE_CONTENT}

_MULTIPART_CONTENT: dict[str, Any] = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "description": "One image per file part; text parts are model parameters. "
            "Parts named 0, 1, 2... (each once) are answered in index order, others in the "
            "order sent; file parts may share a name, text parts may not.",
            "additionalProperties": {"type": "string", "format": "binary"},
        }
    }
}
_MULTIPART_BODY = {"required": True, "content": _MULTIPART_CONTENT}

_COLOR_MODE = {
    "name": "color_mode",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["color", "grayscale", "unchanged"], "default": "color"},
}

_MODEL = {
    "name": "model",
    "in": "path",
    "required": True,
    "description": "a model name; one with slashes (org/model) may send them as they are or as %2F",
    "schema": {"type": "string"},
}


def _infer(summary: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": parameters,
            "requestBody": {
                "required": True,
                "content": {**_IMAGE_CONTENT, **_MULTIPART_CONTENT},
            },
            "responses": {
                "200": _json(
                    {"oneOf": [_ref("InferResponse"), _ref("InferBatchResponse")]},
                    "One image: `result`; a multipart batch: `results`, one per file part, "
                    "each with `output` or its own `error`.",
                ),
                **_ERRORS,
            },
        }
    }


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "image-gateway",
        "version": __version__,
        "description": "Encoded images in (JPEG, PNG, WebP, ...), a model's result per image out.",
    },
    "paths": {
        "/v1/models/{model}/infer": _infer(
            "Run a model on one image or a batch", [_MODEL, _COLOR_MODE]
        ),
        "/v1/infer": _infer("Run the default model on one image or a batch", [_COLOR_MODE]),
        "/": {
            "get": {
                "summary": "The browser page: choose or drop images, see each result",
                "responses": {
                    "200": {
                        "description": "An HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            },
            "post": {
                "summary": "One raw image; the bare model output, as a plain Flask server answers",
                "parameters": [_COLOR_MODE],
                "requestBody": _IMAGE_BODY,
                "responses": {
                    "200": _json({}, "The model's output, such as [h, w, c]."),
                    **_ERRORS,
                },
            },
        },
        "/multi": {
            "post": {
                "summary": "A multipart batch; a list of bare model outputs in part order",
                "parameters": [_COLOR_MODE],
                "requestBody": _MULTIPART_BODY,
                "responses": {
                    "200": _json({"type": "array"}, "One output per file part."),
                    **_ERRORS,
                },
            }
        },
        "/v1/limits": {
            "get": {
                "summary": "The limits in force (the same as gRPC GetLimits)",
                "responses": {"200": _json(_ref("Limits"), "The limits."), **_ERRORS},
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The models served, default first",
                "responses": {"200": _json(_ref("ModelList"), "The models."), **_ERRORS},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model",
                "parameters": [_MODEL],
                "responses": {"200": _json(_ref("ModelInfo"), "The model."), **_ERRORS},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {
                    "200": _json({"type": "object"}, "The process answers."),
                    "503": _json(
                        {"type": "object"},
                        "A model call has hung (one process; several workers replace theirs).",
                    ),
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: models loaded, not draining",
                "responses": {
                    "200": _json({"type": "object"}, "Ready."),
                    "503": _json({"type": "object"}, "Draining for shutdown."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    },
    # Tokens only when the gateway is started with --auth-token-file; the probes, /metrics, this
    # document and the page never ask for one.
    "security": [{}, {"bearer": []}],
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "a token of the gateway's --auth-token-file, when it has one",
            }
        },
        "schemas": {
            "ImageInfo": {
                "type": "object",
                "required": ["width", "height", "channels", "format"],
                "properties": {
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "channels": {"type": "integer"},
                    "format": {"type": "string"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": [e.code for e in ErrorCode]},
                    "message": {"type": "string"},
                },
            },
            "ImageResult": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "info": _ref("ImageInfo"),
                    "output": {},
                    "error": _ref("Error"),
                },
            },
            "InferResponse": {
                "type": "object",
                "required": ["model", "request_id", "result"],
                "properties": {
                    "model": {"type": "string"},
                    "request_id": {"type": "string"},
                    "result": _ref("ImageResult"),
                },
            },
            "InferBatchResponse": {
                "type": "object",
                "required": ["model", "request_id", "results"],
                "properties": {
                    "model": {"type": "string"},
                    "request_id": {"type": "string"},
                    "results": {"type": "array", "items": _ref("ImageResult")},
                },
            },
            "ErrorBody": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "request_id"],
                        "properties": {
                            "code": {"type": "string", "enum": [e.code for e in ErrorCode]},
                            "message": {"type": "string"},
                            "request_id": {"type": "string"},
                            "part": {"type": "string"},
                            "index": {"type": "integer", "minimum": 0},
                        },
                    }
                },
            },
            "ModelInfo": {
                "type": "object",
                "required": ["name", "description", "is_default", "min_input_size", "batching"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "is_default": {"type": "boolean"},
                    "min_input_size": {
                        "description": "The smallest image the model needs, if it declares one: "
                        "a larger JPEG (color or grayscale) is decoded at 1/2, 1/4 or 1/8 scale "
                        "while it still covers it. null: every image is decoded whole.",
                        "type": ["object", "null"],
                        "required": ["width", "height"],
                        "properties": {
                            "width": {"type": "integer"},
                            "height": {"type": "integer"},
                        },
                    },
                    "batching": {
                        "description": "The dynamic batching policy in force (the model's own, "
                        "or --batching): single-image requests arriving together are merged "
                        "into one call of at most max_batch_size images, the first waiting at "
                        "most max_batch_wait_ms for others. null: no batching.",
                        "type": ["object", "null"],
                        "required": ["max_batch_size", "max_batch_wait_ms"],
                        "properties": {
                            "max_batch_size": {"type": "integer", "minimum": 2},
                            "max_batch_wait_ms": {"type": "number", "minimum": 0},
                        },
                    },
                },
            },
            "Limits": {
                "type": "object",
                "required": [
                    "max_request_bytes",
                    "max_image_bytes",
                    "max_images",
                    "max_parts",
                    "max_image_pixels",
                    "max_request_pixels",
                    "request_timeout_seconds",
                ],
                "properties": {
                    "max_request_bytes": {"type": "integer", "description": "largest body"},
                    "max_image_bytes": {"type": "integer", "description": "largest image"},
                    "max_images": {"type": "integer", "description": "images per request"},
                    "max_parts": {"type": "integer", "description": "parts per multipart body"},
                    "max_image_pixels": {"type": "integer", "description": "pixels per image"},
                    "max_request_pixels": {
                        "type": "integer",
                        "description": "pixels of all images of a request",
                    },
                    "request_timeout_seconds": {"type": "number"},
                },
            },
            "ModelList": {
                "type": "object",
                "required": ["models"],
                "properties": {"models": {"type": "array", "items": _ref("ModelInfo")}},
            },
        },
    },
}
