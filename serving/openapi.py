"""The OpenAPI document of the server (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from bladeflow.serving.codec import V2_DATATYPES

JSON = "application/json"

# Spec: a parameter's value is a string, a number or a boolean.
_PARAMETERS = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        # The codec's own table: what the server decodes and encodes is what the document says.
        "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
        "parameters": _PARAMETERS,
        "data": {"type": "array", "description": "row-major values, flat or nested"},
    },
}
_ERR = {
    "description": "error",
    "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_INFER = {
    "summary": "Run inference (routed to champion or canary; X-Routing-Key makes it sticky)",
    "parameters": [
        {"name": "X-Routing-Key", "in": "header", "required": False, "schema": {"type": "string"}}
    ],
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
    },
    "responses": {
        "200": {
            "description": "outputs",
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/InferResponse"}}},
        },
        "400": _ERR,
        "401": _ERR,
        "404": _ERR,
        "413": _ERR,
        "429": _ERR,
        "500": _ERR,
        "503": _ERR,
        "504": _ERR,
    },
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "bladeflow serve (Open Inference Protocol v2)", "version": "2"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            "InferRequest": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": _PARAMETERS,
                    "inputs": {"type": "array", "items": _TENSOR},
                    "outputs": {
                        "type": "array",
                        "description": "only these outputs (an unknown name answers 400)",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": _PARAMETERS,
                            },
                        },
                    },
                },
            },
            "InferResponse": {
                "type": "object",
                "properties": {
                    "model_name": {"type": "string"},
                    "model_version": {"type": "string", "description": "the version that answered"},
                    "id": {"type": "string"},
                    "outputs": {"type": "array", "items": _TENSOR},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v2/health/live": {
            "get": {
                "summary": "Server is live",
                "security": [],
                "responses": {"200": {"description": "live"}},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Every model loaded",
                "security": [],
                "responses": {"200": {"description": "ready"}, "503": _ERR},
            }
        },
        "/v2": {
            "get": {
                "summary": "Server metadata",
                "responses": {"200": {"description": "name, version, extensions"}, "401": _ERR},
            }
        },
        "/v2/models/{name}": {
            "get": {
                "summary": "Model metadata and serving state",
                "parameters": [_NAME],
                "responses": {"200": {"description": "metadata"}, "401": _ERR, "404": _ERR},
            }
        },
        "/v2/models/{name}/versions/{version}": {
            "get": {
                "summary": "Metadata of one loaded version",
                "parameters": [_NAME, _VERSION],
                "responses": {"200": {"description": "metadata"}, "401": _ERR, "404": _ERR},
            }
        },
        "/v2/models/{name}/ready": {
            "get": {
                "summary": "Model ready",
                "parameters": [_NAME],
                "responses": {
                    "200": {"description": "ready"},
                    "401": _ERR,
                    "404": _ERR,
                    "503": _ERR,
                },
            }
        },
        "/v2/models/{name}/versions/{version}/ready": {
            "get": {
                "summary": "That version is loaded and serving",
                "parameters": [_NAME, _VERSION],
                "responses": {"200": {"description": "ready"}, "401": _ERR, "404": _ERR},
            }
        },
        "/v2/models/{name}/infer": {
            "post": {**_INFER, "parameters": [_NAME, *_INFER["parameters"]]}
        },
        "/v2/models/{name}/versions/{version}/infer": {
            "post": {**_INFER, "parameters": [_NAME, _VERSION]}
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text format"}, "401": _ERR},
            }
        },
    },
}
