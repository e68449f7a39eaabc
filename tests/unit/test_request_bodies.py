"""Request bodies of the HTTP API are strict about booleans: ``"yes"`` is not true."""

from __future__ import annotations

import importlib
import pkgutil
import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import promptd.daemon.api as api


def _request_models() -> set[type[BaseModel]]:
    """Every pydantic model the API modules use, with the models nested in them."""
    found: set[type[BaseModel]] = set()
    for info in pkgutil.iter_modules(api.__path__):
        module = importlib.import_module(f"{api.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel:
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
    """The walk finds the boolean fields of the request bodies (so the next test checks
    something)."""
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
