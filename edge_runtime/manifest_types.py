"""The JSON types of ``manifest.json``, checked before any field is used.

``Manifest.from_json`` converts fields with ``int()``/``tuple()``; fed a string
where a list belongs, ``null`` where an object belongs or ``1.5`` as a schema
version, that either raises an unrelated ``TypeError`` or silently accepts
nonsense (``int(1.5) == 1``).  This small declarative schema names the first
field of the wrong type, with its path, before the conversion runs.  NaN and
infinity are refused here too: no manifest number may be one.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping, Union

INT, NUMBER, STR, ANY_OBJECT = "integer", "number", "string", "object"
Spec = Union[str, tuple, dict]


def optional(spec: Spec) -> tuple:
    """A field that may be absent or ``null``."""
    return ("optional", spec)


def list_of(spec: Spec) -> tuple:
    return ("list", spec)


def map_of(spec: Spec) -> tuple:
    return ("map", spec)


TENSOR = {"name": STR, "shape": list_of(INT), "dtype": STR, "layout": STR,
          "scale": optional(NUMBER), "zero_point": optional(INT)}
FRAGMENT = {"id": STR, "role": STR, "format": STR, "precision": STR, "file": STR, "sha256": STR, "bytes": INT,
            "inputs": list_of(TENSOR), "outputs": list_of(TENSOR), "task": optional(STR),
            "class_ids": optional(list_of(INT)), "library_sha256": optional(STR), "scheme": optional(ANY_OBJECT),
            "agreement": optional(ANY_OBJECT), "stage": optional(INT), "latency": optional(NUMBER)}
PREPROCESSING = {"input_shape": list_of(INT), "mean": list_of(NUMBER), "std": list_of(NUMBER),
                 "image_dtype": optional(STR), "image_layout": optional(STR)}
MANIFEST = {"schema_version": INT, "pool_id": STR, "preprocessing": PREPROCESSING, "class_names": list_of(STR),
            "tasks": map_of(list_of(INT)), "fragments": list_of(FRAGMENT), "seam": optional(ANY_OBJECT),
            "composites": optional(ANY_OBJECT), "tools": optional(ANY_OBJECT)}  # tool versions, latency conditions


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def type_problem(value: Any, spec: Spec = MANIFEST, where: str = "manifest") -> str | None:
    """The first field of ``value`` that does not have the type ``spec`` gives, as one sentence; None if all do."""
    if isinstance(spec, tuple):
        kind, inner = spec
        if kind == "optional":
            return None if value is None else type_problem(value, inner, where)
        if kind == "list":
            if not isinstance(value, (list, tuple)):  # tuples: Manifest.to_json() handed back without JSON
                return f"{where} must be a list, got {_type_name(value)}"
            return next((p for i, item in enumerate(value) if (p := type_problem(item, inner, f"{where}[{i}]"))),
                        None)
        if not isinstance(value, dict):
            return f"{where} must be an object, got {_type_name(value)}"
        return next((p for key, item in value.items() if (p := type_problem(item, inner, f"{where}.{key}"))), None)
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where} must be an object, got {_type_name(value)}"
        for key, field_spec in spec.items():
            if key not in value:
                if isinstance(field_spec, tuple) and field_spec[0] == "optional":
                    continue
                return f"{where} lacks field {key!r}"
            problem = type_problem(value[key], field_spec, f"{where}.{key}")
            if problem:
                return problem
        return None
    return _scalar_problem(value, spec, where)


def _scalar_problem(value: Any, spec: str, where: str) -> str | None:
    if spec == ANY_OBJECT:
        return None if isinstance(value, dict) else f"{where} must be an object, got {_type_name(value)}"
    if spec == STR:
        return None if isinstance(value, str) else f"{where} must be a string, got {_type_name(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{where} must be an {spec}, got {_type_name(value)}" if spec == INT else \
            f"{where} must be a number, got {_type_name(value)}"
    if spec == INT and not isinstance(value, int):
        return f"{where} must be an integer, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} must be a finite number, got {value!r}"
    return None


def reject_constant(name: str) -> float:
    """``json.loads(parse_constant=...)``: NaN, Infinity and -Infinity are not JSON and not accepted."""
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


MAX_JSON_DEPTH = 64  # a manifest nests about 8 deep; the C decoder recurses once per level
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting outside strings, found without recursion.

    json's C decoder recurses per level; in a process whose recursion limit was
    raised (some ML libraries raise it on import) 100,000 ``[`` overflow the C
    stack and kill the process instead of raising RecursionError.
    """
    depth = deepest = 0
    for char in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def strict_loads(data: bytes | str, what: str) -> Any:
    """JSON from an untrusted peer, where every failure is a ValueError naming ``what``.

    ``json.loads`` raises RecursionError on deep nesting, a bare ValueError on
    integers over 4,300 digits, and accepts NaN and 1e999; each of those turned
    a bad request or answer into a 500 or a traceback.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        if nesting_depth(text) > MAX_JSON_DEPTH:
            raise RecursionError
        return json.loads(text, parse_constant=reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be valid JSON here") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def check_types(raw: Mapping[str, Any]) -> str | None:
    """Shorthand for the whole manifest."""
    return type_problem(raw, MANIFEST, "manifest")
