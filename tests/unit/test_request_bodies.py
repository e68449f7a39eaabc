"""Request bodies of the HTTP API are strict about booleans: ``"yes"`` is not true."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import promptd.daemon.api as api

#: How a route reads its body: ``read_body(request, Model)``, a module's own
#: ``_body(request, Model)``, or ``Model.model_validate(...)``.
_READERS = {"read_body", "_body"}


def _body_model_names(source: str) -> set[str]:
    """Names of the models a module's handlers validate request bodies with."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in _READERS and len(node.args) == 2:
            if isinstance(node.args[1], ast.Name):
                names.add(node.args[1].id)
        elif (
            isinstance(func, ast.Attribute)
            and func.attr == "model_validate"
            and isinstance(func.value, ast.Name)
        ):
            names.add(func.value.id)
    return names


def _request_models() -> set[type[BaseModel]]:
    """Every model a route of the API validates a request body with, and the models
    nested in them."""
    found: set[type[BaseModel]] = set()
    for info in pkgutil.iter_modules(api.__path__):
        module = importlib.import_module(f"{api.__name__}.{info.name}")
        source = Path(module.__file__ or "").read_text()
        for name in _body_model_names(source):
            value = getattr(module, name, None)
            if isinstance(value, type) and issubclass(value, BaseModel):
                found.add(value)
    todo = list(found)
    while todo:
        for field in todo.pop().model_fields.values():
            for inner in _types(field.annotation):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in found:
                    found.add(inner)
                    todo.append(inner)
    return found


def _types(annotation: Any) -> list[Any]:
    out = [annotation]
    for arg in typing.get_args(annotation):
        out += _types(arg)
    return out


def _bool_fields() -> list[tuple[type[BaseModel], str]]:
    out = []
    for model in _request_models():
        for name, field in model.model_fields.items():
            if bool in _types(field.annotation) or (
                isinstance(field.annotation, types.UnionType) and bool in field.annotation.__args__
            ):
                out.append((model, name))
    return sorted(out, key=lambda mf: (mf[0].__name__, mf[1]))


def test_the_api_has_boolean_fields_to_check() -> None:
    """The walk finds the request bodies of the routes and their boolean fields (so the
    next test checks something)."""
    models = {model.__name__ for model in _request_models()}
    assert {"StartRollout", "Experiment", "NewVersion", "Restore", "Reason"} <= models
    assert {"StartPipelineRollout", "OptimizeRequest"} <= models
    names = {f"{model.__name__}.{name}" for model, name in _bool_fields()}
    assert {"StartRollout.require_win", "NewVersion.activate", "NewVersion.force"} <= names
    assert "StartPipelineRollout.require_win" in names


@pytest.mark.parametrize(("model", "name"), _bool_fields(), ids=lambda v: getattr(v, "__name__", v))
def test_every_boolean_in_a_request_body_is_strict(model: type[BaseModel], name: str) -> None:
    """``"yes"``, ``"true"``, ``1`` and ``"1"`` are refused for a boolean field, naming it;
    only JSON ``true``/``false`` are booleans."""
    for value in ("yes", "true", 1, "1", 0):
        with pytest.raises(ValidationError) as error:
            model.__pydantic_validator__.validate_assignment(model.model_construct(), name, value)
        assert error.value.errors()[0]["loc"][-1] == name
