"""The expressions of a table spec (``results/<exp>/table.yaml``): one Python expression over the records, checked
before it is evaluated.

Allowed: literals, names of the namespace (the records, the spec's ``let`` values, the helpers below), attribute and
item access, arithmetic, comparisons, ``and``/``or``/``not``, ``x if c else y``, comprehensions, lambdas, f-strings
and calls. Refused: names and attributes starting with ``_`` (no way out to ``__class__``, ``__globals__``...),
``str.format`` (its replacement fields read attributes by name),
assignments, imports, and every builtin not listed in ``HELPERS``.
"""
from __future__ import annotations

import ast
import math
import statistics
from collections.abc import Mapping
from functools import lru_cache

ALLOWED = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Attribute, ast.Subscript, ast.Slice, ast.Tuple,
           ast.List, ast.Dict, ast.Set, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call,
           ast.keyword, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.comprehension, ast.Store,
           ast.Lambda, ast.arguments, ast.arg, ast.JoinedStr, ast.FormattedValue, ast.Starred,
           ast.operator, ast.unaryop, ast.boolop, ast.cmpop)
NO_ATTRIBUTES = ("format", "format_map")  # "{0.__class__}".format(x) would walk past the '_' check


class Rec(dict):
    """A record (or any mapping) whose keys read as attributes: ``r.metrics.ppl``; a missing key reads None.
    A key named like a dict method (``keys``, ``items``, ``get``) is read as ``p['keys']``."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return wrap(self.get(name))

    def __getitem__(self, key):
        return wrap(super().__getitem__(key))

    def get(self, key, default=None):
        return wrap(super().get(key, default))


def wrap(value):
    """Mappings as ``Rec``, all the way down (also inside lists, and the values ``.items()`` and ``.values()``
    give), so nested fields read as attributes too. A ``Rec`` is taken as already wrapped."""
    if isinstance(value, Rec):
        return value
    if isinstance(value, Mapping):
        return Rec({k: wrap(v) for k, v in value.items()})
    if isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
        return [wrap(v) for v in value]
    return value


class SpecError(ValueError):
    """A table spec that cannot be read or evaluated: names the spec file and the expression."""


def where(rows: list, **equal) -> list:
    """The rows whose fields equal ``equal`` (``where(records, cache="full")``)."""
    return [r for r in rows if all(r.get(k) == v for k, v in equal.items())]


def first(rows: list, **equal):
    """The first row whose fields equal ``equal``, or None."""
    return next(iter(where(rows, **equal)), None)


def last(rows: list, **equal):
    """The last row whose fields equal ``equal``, or None."""
    found = where(rows, **equal)
    return found[-1] if found else None


def fail(message: str):
    """Stop the build with ``message`` (a spec's check: ``[fail(...) for r in records if <not measured>]``)."""
    raise SpecError(message)


HELPERS = {f.__name__: f for f in (abs, all, any, bool, dict, enumerate, float, format, int, isinstance, len, list,
                                   max, min, next, range, reversed, round, set, sorted, str, sum, tuple, zip,
                                   where, first, last, fail, iter)}
HELPERS.update(mean=statistics.mean, median=statistics.median, prod=math.prod)


@lru_cache(maxsize=4096)
def compile_expr(text: str, where_: str = "") -> object:
    """``text`` checked against ``ALLOWED``, compiled for ``evaluate``."""
    try:
        tree = ast.parse(f"(\n{text}\n)", mode="eval")  # in parentheses: a YAML block may span lines
    except SyntaxError as e:
        raise SpecError(f"{where_}: not a Python expression: {text!r} ({e.msg})") from None
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED):
            raise SpecError(f"{where_}: {type(node).__name__} is not allowed in a table expression: {text!r}")
        name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None)
        if isinstance(name, str) and name.startswith("_"):
            raise SpecError(f"{where_}: names starting with '_' are not allowed: {text!r}")
        if isinstance(node, ast.Attribute) and node.attr in NO_ATTRIBUTES:
            raise SpecError(f"{where_}: .{node.attr}() is not allowed (its fields reach any attribute); use an "
                            f"f-string: {text!r}")
    return compile(tree, where_ or "<table spec>", "eval")


def evaluate(text: str, namespace: dict, where_: str = ""):
    """The value of the expression ``text`` with ``namespace`` (and ``HELPERS``) as its names."""
    code = compile_expr(text, where_)
    try:
        # one globals dict: lambdas and comprehensions see the namespace too
        return eval(code, {"__builtins__": {}, **HELPERS, **namespace})  # noqa: S307 (checked above)
    except SpecError:  # a spec's own check (fail) says what is wrong
        raise
    except Exception as e:  # the spec's author needs the expression that failed, not a bare KeyError
        raise SpecError(f"{where_}: {type(e).__name__}: {e} in {text!r}") from e
