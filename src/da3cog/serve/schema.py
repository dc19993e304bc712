"""The OpenAPI schema of the predictor, as ``cog build`` writes it to ``.cog/openapi_schema.json``.

The cog server (coglet) validates every request's ``input`` against
``components.schemas.Input`` of the schema file it finds at ``.cog/openapi_schema.json``
(relative to its working folder) and answers 422 on a mismatch; without the file it accepts
anything. ``cog build`` makes the file with its Go CLI, which is not available outside Docker,
so this module makes the same document from the predictor's signature: types through cog's
own inspector (the one its worker uses), layout after cog's generator (``pkg/schema/openapi.go``
of cog 0.23: enums as ``allOf`` references named after the input, ``x-order``, ``nullable``,
``x-cog-accept``).

Usage: ``python -m da3cog.serve.schema [--predictor predict.py:Runner] [--output PATH]
[--check]`` (``--check`` exits 1 when PATH differs from what the predictor gives).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_PREDICTOR = "predict.py:Runner"
DEFAULT_OUTPUT = Path(".cog") / "openapi_schema.json"


def title_case(name: str) -> str:
    """``model_size`` -> ``Model Size`` (cog's TitleCase)."""
    return " ".join(word[:1].upper() + word[1:] for word in name.split("_"))


def load_runner(reference: str) -> type:
    """The class named by ``path/to/file.py:Class``, imported as cog's server imports it."""
    file_name, _, class_name = reference.partition(":")
    path = Path(file_name).resolve()
    module_name = path.stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return getattr(module, class_name or "Runner")


def _field_infos(runner: type) -> dict[str, Any]:
    """The ``Input(...)`` of every parameter of ``run`` (for what cog's inspector drops)."""
    from cog.input import FieldInfo

    parameters = inspect.signature(runner.run).parameters
    return {
        name: parameter.default
        for name, parameter in parameters.items()
        if name != "self" and isinstance(parameter.default, FieldInfo)
    }


def openapi_schema(runner: type) -> dict[str, Any]:
    """The OpenAPI 3.0.2 document for ``runner`` (a cog BaseRunner subclass)."""
    from cog import _adt as adt
    from cog._inspector import create_predictor

    info = create_predictor(runner.__module__, runner.__name__)
    field_infos = _field_infos(runner)
    properties: dict[str, Any] = {}
    required: list[str] = []
    enums: dict[str, Any] = {}
    for name, field in sorted(info.inputs.items(), key=lambda item: item[1].order):
        prop: dict[str, Any] = {"x-order": field.order}
        field_type = field.type
        if field.choices:
            json_type = field_type.primitive.json_type().get("type", "string")
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": json_type,
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = title_case(name)
            prop.update(field_type.json_type())
        nullable = field_type.repetition in (
            adt.Repetition.OPTIONAL,
            adt.Repetition.OPTIONAL_REPEATED,
        )
        if field.default is None and not nullable:
            required.append(name)
        if field.default is not None:
            prop["default"] = field_type.json_encode(field.default)
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        accept = getattr(field_infos.get(name), "accept", None)
        if accept:
            prop["x-cog-accept"] = accept
        properties[name] = prop
    input_schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    schemas: dict[str, Any] = {"Input": input_schema, "Output": info.output.json_type()}
    schemas.update(enums)
    schemas.update(_fixed_schemas())
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": _paths(),
        "components": {"schemas": schemas},
    }


def _number(value: float) -> int | float:
    """cog stores bounds as floats; integral ones are written as integers."""
    return int(value) if float(value).is_integer() else float(value)


def _json_response(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "Successful Response",
        "content": {"application/json": {"schema": schema}},
    }


def _validation_error() -> dict[str, Any]:
    return {
        "description": "Validation Error",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
        },
    }


def _paths() -> dict[str, Any]:
    return {
        "/": {
            "get": {
                "summary": "Root",
                "operationId": "root__get",
                "responses": {"200": _json_response({})},
            }
        },
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": _json_response({})},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/PredictionRequest"}
                        }
                    }
                },
                "responses": {
                    "200": _json_response({"$ref": "#/components/schemas/PredictionResponse"}),
                    "422": _validation_error(),
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": _json_response({}), "422": _validation_error()},
            }
        },
    }


def _fixed_schemas() -> dict[str, Any]:
    def string(title: str, **extra: str) -> dict[str, str]:
        return {"title": title, "type": "string", **extra}

    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {"id": string("Id"), "input": {"$ref": "#/components/schemas/Input"}},
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "id": string("Id"),
                "version": string("Version"),
                "created_at": string("Created At", format="date-time"),
                "started_at": string("Started At", format="date-time"),
                "completed_at": string("Completed At", format="date-time"),
                "status": string("Status"),
                "error": string("Error"),
                "logs": string("Logs"),
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": string("Message"),
                "type": string("Error Type"),
            },
        },
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m da3cog.serve.schema",
        description="Write the OpenAPI schema that the cog server validates inputs against.",
    )
    parser.add_argument("--predictor", default=DEFAULT_PREDICTOR, help="FILE.py:Class")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="schema file")
    parser.add_argument(
        "--check", action="store_true", help="compare with --output instead of writing it"
    )
    args = parser.parse_args(argv)
    text = render(openapi_schema(load_runner(args.predictor)))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} does not match {args.predictor}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
