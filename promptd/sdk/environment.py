"""The SDK's check of the app's ``PROMPTD_`` environment: a typo is warned about, not ignored.

The daemon refuses a ``PROMPTD_`` variable that names no setting; an app cannot be
refused (the SDK never raises into it), so the SDK warns once per variable, with the
closest known name. Known names are the SDK's own (:mod:`promptd.sdk.config`) and the
daemon's (:mod:`promptd.sdk.daemon_variables`, generated from its settings), since apps and
the daemon often share one environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from promptd.sdk.daemon_variables import DAEMON_PREFIXES, DAEMON_VARIABLES
from promptd.sdk.notices import warn_once

PREFIX = "PROMPTD_"


def unknown_variables(names: Iterable[str], sdk_names: Iterable[str]) -> list[tuple[str, str]]:
    """``(name, closest known name or "")`` for each ``PROMPTD_`` name nothing reads."""
    known = {*sdk_names, *DAEMON_VARIABLES}
    unknown = [
        name
        for name in names
        if name.upper().startswith(PREFIX)
        and name.upper() not in known
        and not name.upper().startswith(DAEMON_PREFIXES)
    ]
    if not unknown:
        return []
    import difflib  # only when there is something to suggest

    choices = sorted(known)
    result = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name.upper(), choices, n=1, cutoff=0.6)
        result.append((name, close[0] if close else ""))
    return result


def check_environment(env: Mapping[str, str], sdk_names: Iterable[str]) -> None:
    """Warn once per ``PROMPTD_`` variable of ``env`` that neither the SDK nor the daemon
    reads."""
    for name, close in unknown_variables(env, sdk_names):
        hint = f" (did you mean {close}?)" if close else ""
        warn_once(
            f"variable:{name}",
            f"unknown variable {name}{hint}: neither the SDK nor the daemon reads it, so "
            "it has no effect",
        )


def invalid_value(name: str, raw: str, expected: str) -> None:
    """Warn once that variable ``name`` holds a value the SDK cannot use."""
    # Only numbers and booleans fail to parse, never a secret (those are strings).
    message = f"invalid value {raw!r} in {name}: expected {expected}; the default is used"
    warn_once(f"value:{name}", message)
