"""pydantic errors as messages a person can act on: unknown keys named, prefixes gone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from promptd._validation import clean_message, validation_message
from promptd.replacement.registry import NewVersion


def _message(data: object) -> str:
    with pytest.raises(ValidationError) as caught:
        NewVersion.model_validate(data)
    return validation_message(caught.value, NewVersion)


def test_a_misspelled_key_of_a_chat_configuration_is_named() -> None:
    """[[message]] instead of [[messages]]: the unknown key is named with the one meant,
    not the 'Field required' of the key it hides."""
    config = {"message": [{"role": "user", "content": "{text}"}]}
    assert _message({"config": config}) == (
        "config: unknown key 'message' (did you mean 'messages'? allowed: messages, model, "
        "params, output_schema, tunable, demos, ensemble)"
    )


def test_an_unknown_key_inside_a_message_is_named() -> None:
    """A key inside one message is named with its position and the allowed keys."""
    config = {"messages": [{"role": "user", "text": "{text}"}]}
    assert _message({"config": config}) == (
        "config.messages.0: unknown key 'text' (allowed: role, content)"
    )


def test_value_error_prefixes_are_removed() -> None:
    """A validator's ValueError reads as its own message, without 'Value error, '."""
    config = {"messages": [{"role": "system", "content": "x"}]}
    message = _message({"config": config})
    assert message == "config: the last message must be the user's turn (role 'user')"
    assert clean_message("Value error, x") == "x"
    assert clean_message("Assertion failed, y") == "y"
    assert clean_message("Input should be a valid string") == "Input should be a valid string"


def test_without_a_model_the_unknown_key_is_still_named() -> None:
    """Where the model is not known, the key is named without suggestions."""
    with pytest.raises(ValidationError) as caught:
        NewVersion.model_validate({"template": "{a}", "versoin": "v2"})
    assert validation_message(caught.value) == "unknown key 'versoin'"
