"""pydantic's validation errors of a run config as one line per key, `key: value must be ...`
(`synthesis.ipc: 0 must be >= 1`). A validator's own message names its keys itself; the recipe
sections (storage/recipes.py) word theirs as the recipe dataclasses' checks did: a tuple item as
`betas[1]`, a range with two bounds whole (`1.0 must be in [0, 1)`).
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ValidationError

from .recipes import RECIPES


def describe(e: ValidationError) -> str:
    """Every problem of `e`, once each, joined by "; "."""
    return "; ".join(dict.fromkeys(_problem(dict(err)) for err in e.errors()))


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_KINDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
}


def _problem(err: dict[str, Any]) -> str:
    loc, kind, value, ctx = tuple(err["loc"]), err["type"], err.get("input"), err.get("ctx", {})
    if kind == "value_error":
        return str(ctx["error"])
    recipe = RECIPES.get(loc[:2])
    if recipe is not None and (worded := _recipe_problem(recipe, loc, kind, value)):
        return worded
    key = ".".join(str(p) for p in loc)
    if kind in _BOUNDS:
        bound, op = _BOUNDS[kind]
        limit = ctx[bound]
        return (
            f"{key}: {value!r} must be {op} {f'{limit:g}' if isinstance(limit, float) else limit}"
        )
    if kind in _KINDS:
        return f"{key}: {value!r} must be {_KINDS[kind]}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {ctx['expected']}"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    return f"{key}: {value!r}: {err['msg']}" if "input" in err else f"{key}: {err['msg']}"


def _recipe_problem(recipe: type[BaseModel], loc: tuple[Any, ...], kind: str, value: Any) -> str:
    """An error in a recipe section worded as the recipe dataclasses' checks did; "" where that
    is the general wording."""
    where = ".".join(loc[:2])
    if kind == "extra_forbidden":
        return f"unknown key(s) [{loc[-1]!r}] in {where}; known: {sorted(recipe.model_fields)}"
    loc = loc[:-1] if kind == "missing" else loc  # a tuple item missing: the tuple is short
    key = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[2:])
    rule = _schema_at(recipe, loc[2:])
    if kind in ("missing", "too_long"):
        return f"{key}: {list(value)!r} must have {rule['minItems']} values, not {len(value)}"
    if kind == "tuple_type":
        return f"{key}: {value!r} must be a list of {rule['minItems']} numbers"
    low = [(b, rule[k]) for b, k in (("(", "exclusiveMinimum"), ("[", "minimum")) if k in rule]
    high = [(rule[k], b) for k, b in (("exclusiveMaximum", ")"), ("maximum", "]")) if k in rule]
    if kind in _BOUNDS and low and high:
        return f"{key}: {value!r} must be in {low[0][0]}{low[0][1]:g}, {high[0][0]:g}{high[0][1]}"
    return ""


@functools.cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _schema_at(model: type[BaseModel], path: tuple[Any, ...]) -> dict[str, Any]:
    """The JSON schema of the value at `path` (field names and tuple positions) in `model`."""
    node = _schema(model)
    for part in path:
        node = _not_null(node)
        node = node["prefixItems"][part] if isinstance(part, int) else node["properties"][part]
    return _not_null(node)


def _not_null(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None`'s schema -> X's."""
    return next(n for n in node.get("anyOf", [node]) if n.get("type") != "null")
