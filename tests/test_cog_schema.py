"""predict.py's signature, the shared input table and the generated OpenAPI schema agree."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from da3cog.serve.inputs import INPUTS, REQUIRED
from da3cog.serve.schema import load_runner, main, openapi_schema, render

ROOT = Path(__file__).resolve().parent.parent
PREDICTOR = f"{ROOT / 'predict.py'}:Runner"


@pytest.fixture(scope="module")
def runner() -> type:
    return load_runner(PREDICTOR)


@pytest.fixture(scope="module")
def schema(runner: type) -> dict:
    return openapi_schema(runner)


def test_predict_py_spells_out_the_shared_inputs(runner: type) -> None:
    from cog.input import FieldInfo

    parameters = [p for p in inspect.signature(runner.run).parameters.values() if p.name != "self"]
    assert [p.name for p in parameters] == [spec.name for spec in INPUTS]
    for parameter, spec in zip(parameters, INPUTS, strict=True):
        field = parameter.default
        assert isinstance(field, FieldInfo), spec.name
        assert parameter.annotation == spec.annotation, spec.name
        assert field.description == spec.description, spec.name
        assert field.default == (None if spec.default is REQUIRED else spec.default), spec.name
        assert field.choices == (None if spec.choices is None else list(spec.choices))
        assert (field.ge, field.le, field.accept) == (spec.ge, spec.le, spec.accept), spec.name


def test_schema_matches_the_signature(schema: dict) -> None:
    components = schema["components"]["schemas"]
    inputs = components["Input"]
    assert list(inputs["properties"]) == [spec.name for spec in INPUTS]
    assert inputs["required"] == [spec.name for spec in INPUTS if spec.required]
    for order, spec in enumerate(INPUTS):
        prop = inputs["properties"][spec.name]
        assert prop["x-order"] == order
        assert prop["description"] == spec.description
        if spec.required:
            assert "default" not in prop
        elif spec.default is not None:
            assert prop["default"] == spec.default
        else:
            assert prop["nullable"] is True
        if spec.choices is not None:
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{spec.name}"}]
            assert components[spec.name]["enum"] == list(spec.choices)
        if spec.ge is not None:
            assert (prop["minimum"], prop["maximum"]) == (spec.ge, spec.le)
        if spec.accept is not None:
            assert prop["x-cog-accept"] == spec.accept
    assert components["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }
    assert {"/predictions", "/predictions/{prediction_id}/cancel", "/health-check"} <= set(
        schema["paths"]
    )


def test_every_input_has_a_description_and_choices_or_bounds() -> None:
    for spec in INPUTS:
        assert len(spec.description) > 20, spec.name
        if spec.annotation in ("int", "float"):
            assert spec.ge is not None and spec.le is not None, spec.name
            assert spec.ge <= spec.default <= spec.le, spec.name
        elif spec.annotation == "str":
            assert spec.choices and spec.default in spec.choices, spec.name
        elif "Path" in spec.annotation:
            assert spec.accept, spec.name


def test_inputs_validate_like_the_server(schema: dict) -> None:
    """The Input schema with $refs inlined and additionalProperties false, as coglet
    compiles it, accepts the defaults and rejects bad choices and bounds."""
    import jsonschema

    components = schema["components"]["schemas"]
    text = json.dumps(components["Input"])
    for name in components:
        text = text.replace(
            json.dumps({"$ref": f"#/components/schemas/{name}"}), json.dumps(components[name])
        )
    validator = jsonschema.Draft202012Validator({**json.loads(text), "additionalProperties": False})
    assert validator.is_valid({"image": "https://example.invalid/a.jpg"})
    for bad in (
        {"image": "x", "mode": "stereo"},
        {"image": "x", "process_resolution": 2000},
        {"image": "x", "max_points": 5},
        {"mode": "monocular"},
    ):
        assert not validator.is_valid(bad), bad


def test_generator_cli_writes_and_checks(tmp_path: Path, schema: dict) -> None:
    target = tmp_path / ".cog" / "openapi_schema.json"
    assert main(["--predictor", PREDICTOR, "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == schema
    assert target.read_text() == render(schema)
    assert main(["--predictor", PREDICTOR, "--output", str(target), "--check"]) == 0
    target.write_text(target.read_text().replace('"default": 504', '"default": 518'))
    assert main(["--predictor", PREDICTOR, "--output", str(target), "--check"]) == 1
