"""Every JSON file the tool reads goes through here: parsed, checked to be an object, its fields typed.

    data = read_json_object(path, fix="re-export the checkpoint")
    HF_LLAMA.check(data, path)

A failure is a `UserError` naming the file and the field, ending in what to do (`fix`), which the CLI
prints as one line. Types are plain Python types; `int` never accepts a bool, float accepts an int,
`None` in the tuple makes a field nullable. A schema checks the fields it names and lets others pass
(files written by other tools carry fields we do not read), unless `closed=True`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}


def json_type(value) -> str:
    for kind, name in _NAMES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def read_json(path: str | Path, *, fix: str):
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {fix}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}); {fix}") from None
    return parse_json(text, path, fix=fix)


def parse_json(text: str, origin: str | Path, *, fix: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{origin}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        f"{fix}") from None


def read_json_object(path: str | Path, *, fix: str) -> dict:
    data = read_json(path, fix=fix)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {json_type(data)}; {fix}")
    return data


@dataclass(frozen=True)
class Schema:
    fields: dict[str, tuple[type, ...]]
    required: tuple[str, ...] = ()
    closed: bool = False  # unknown fields are errors
    fix: str = ""

    def check(self, data, origin: str | Path) -> dict:
        fix = f"; {self.fix}" if self.fix else ""
        if not isinstance(data, dict):
            raise UserError(f"{origin}: expected a JSON object, found {json_type(data)}{fix}")
        missing = [name for name in self.required if name not in data]
        if missing:
            raise UserError(f"{origin}: missing field{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(repr, missing))}{fix}")
        if self.closed:
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise UserError(f"{origin}: unknown field{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(map(repr, unknown))}{fix}")
        for name, kinds in self.fields.items():
            if name in data and not _is(data[name], kinds):
                expected = " or ".join(_NAMES.get(k, k.__name__) for k in kinds)
                raise UserError(f"{origin}: field {name!r} must be {expected}, found "
                                f"{json_type(data[name])} {_short(data[name])}{fix}")
        return data

    @classmethod
    def of_dataclass(cls, klass, *, fix: str = "") -> "Schema":
        """The fields of a dataclass with their annotated types; those without a default are required."""
        hints = typing.get_type_hints(klass)
        fields = {f.name: _json_kinds(hints[f.name]) for f in dataclasses.fields(klass)}
        required = tuple(f.name for f in dataclasses.fields(klass)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        return cls(fields, required, closed=True, fix=fix)


def _is(value, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else ""
    return text if len(text) <= 40 else text[:37] + "..."


def _json_kinds(hint) -> tuple[type, ...]:
    """The JSON types a field annotated `hint` is read from (a tuple field from a list)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(k for arg in typing.get_args(hint) for k in _json_kinds(arg))
    if origin in (tuple, list) or hint in (tuple, list):
        return (list,)
    if origin is dict or hint is dict:
        return (dict,)
    return (hint,)
