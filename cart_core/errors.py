"""The one exception type for bad input.

`cart` exits 2 with the message of a `BadInput` (one line naming the file, the row and the
reason) and 1 with anything else, so a bug raising `ValueError` deep in a library is reported as a
failed job, not blamed on the user's file. It subclasses ValueError so library callers that
catch ValueError keep working.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MAX_SHOWN = 60  # characters of a user's value quoted in a message: messages never echo unbounded input


class BadInput(ValueError):
    """The user's file, argument or configuration is wrong; the message says where and why."""


class InputNotFound(BadInput, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ConfigError(BadInput):
    """A configuration key or value is wrong: the message names the key, the value and the choices."""


class LocatedError(BadInput):
    """Bad input at a known place: `<file>: row <r>: <reason>` (row 0-based, when there is one)."""

    def __init__(self, path: str | Path, row: int | None, reason: str) -> None:
        self.path = str(path)
        self.row = None if row is None else int(row)
        self.reason = reason
        where = self.path if self.row is None else f"{self.path}: row {self.row}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable: Ray ships exceptions between processes
        return (type(self), (self.path, self.row, self.reason))


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library error's first non-empty line, cut to `limit` characters (its type when it has none),
    for one-line messages that name our file around it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(exc).__name__


def shown(value: object) -> str:
    """A user's value quoted in a message, cut to MAX_SHOWN characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(str(value))} characters)"


@contextmanager
def model_setting(key: str, name: str) -> Iterator[None]:
    """A model the config key `key` names (`name`: hub name or local path) that does not load is
    a ConfigError naming the key: checked by a job's driver from the model's config files, before
    Ray starts and long before an actor would fail loading its weights."""
    try:
        yield
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, BadInput):
            raise
        where = name if len(name) <= MAX_SHOWN else "…" + name[-(MAX_SHOWN - 1):]  # a path's end says the most
        why = "no such folder" if name.startswith(("/", ".")) and not os.path.exists(name) else first_line(exc)
        raise ConfigError(f"{key}: {where!r} cannot be loaded ({why})") from None
