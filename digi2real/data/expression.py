"""``--where EXPR``: a small, safe filter language over per-image attributes.

A ``--where`` expression is data, never code. It is parsed with :func:`ast.parse`, every node
is checked against a strict whitelist before anything is evaluated, and the checked tree is
evaluated column by column with numpy. Nothing is ever handed to ``eval``, ``exec`` or
``compile``, and no Python object is ever looked up by a name from the expression: names are
only keys into the table of attributes.

Examples::

    abs(yaw) > 30 and pitch < 10
    -30 < yaw < 30
    glasses == 1 or hair in ["short", "bald"]
    not (face_size_est < 40)
    isnull(age) or max(abs(yaw), abs(pitch)) >= 45
    hair != "bald" and (width / height) > 0.8

Grammar
-------
Values
    attribute names (``yaw``, ``hair``, ...; a name starting with ``__`` is refused);
    numbers (integers up to 10**15 in size, finite decimals); text in quotes (at most 200
    characters); ``true`` / ``false`` (or ``True`` / ``False``); ``null`` (or ``None``).
    These constant words win over an attribute with the same name.
Arithmetic
    ``+ - * / %`` and unary ``-`` / ``+``, on numbers; true/false count as 1/0 (so
    ``(yaw > 30) + (pitch > 30) >= 1`` counts conditions). ``**`` is refused (an exponent
    can blow up: write ``yaw * yaw``), as are ``//`` and the bit operations ``& | ^ ~ << >>``.
    Text takes no arithmetic.
Comparisons
    ``== != < <= > >=``, chained as in Python (``-30 < yaw < 30`` means ``-30 < yaw and
    yaw < 30``). Numbers compare with numbers (true/false as 1/0), text with text
    (``<`` is alphabetical). ``x in [a, b, ...]`` and ``x not in [...]`` take a list (or a
    tuple or set) of at most 1000 constants, all numbers or all text, and must end a chain.
    ``x == null`` / ``x != null`` test for a missing value; ``is`` is refused.
Conditions
    ``and``, ``or`` and ``not`` combine conditions: comparisons, ``isnull`` / ``notnull``,
    true/false attributes, ``true`` / ``false``. A number is not a condition: for a 0/1
    attribute write ``glasses == 1``, not ``glasses``.
Functions
    ``abs(x)``; ``min(x, y, ...)`` and ``max(x, y, ...)`` (element-wise, two or more
    arguments); ``isnull(attr)`` / ``notnull(attr)`` (is the attribute missing; the
    argument is an attribute name). No other call, no keyword or ``*`` arguments.

Everything else is refused before evaluation with an :class:`ExpressionError`: attribute
access (``a.b``), subscripts (``a[0]``), other calls, lambdas, comprehensions, f-strings,
``:=``, ``if``/``else``, dicts, bytes and complex literals, ``...``. The whole expression
must be a condition (``yaw + 1`` is refused), at most :data:`MAX_LENGTH` characters and
:data:`MAX_NODES` nodes (the items of an ``in`` list are not counted), nested at most 100
deep.

Missing values
--------------
An attribute may be missing for an image: ``None`` in a text or true/false attribute, NaN
(or ``None``) in a numeric one. The rules are simple, two-valued (not SQL's three-valued
logic):

* every comparison with a missing value is false, ``!=`` and ``not in`` included;
* ``not`` does not undo that: ``not (yaw > 30)`` is TRUE for an image without a yaw, so
  write ``notnull(yaw) and not (yaw > 30)`` (or ``yaw <= 30``) to leave those out;
* arithmetic with a missing value is missing, and so is ``min`` / ``max`` with a missing
  argument; division by zero gives an infinity (0/0 gives a missing value), silently;
* a missing true/false attribute counts as false where a condition is expected;
* ``isnull(x)``, ``notnull(x)``, ``x == null`` and ``x != null`` select on missingness.

Errors
------
:class:`ExpressionError` (a :class:`ValueError`) carries a one-line message that says what
is wrong and where, e.g. ``attribute 'hair' is text; compare it with text, e.g. hair ==
"short"; at column 1 of --where: hair > 3``. An unknown attribute gets a suggestion:
``unknown attribute 'yawn' in --where; did you mean 'yaw'? known: hair, pitch, yaw``.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

MAX_LENGTH = 2000
"""The longest ``--where`` text accepted, in characters."""

MAX_NODES = 500
"""The most AST nodes (expressions; the items of an ``in`` list not counted) accepted."""

_MAX_DEPTH = 100
_MAX_LIST = 1000
_MAX_TEXT = 200
_MAX_INT = 10**15
_FUNCTIONS = ("abs", "min", "max", "isnull", "notnull")
_CONSTANT_NAMES: Mapping[str, bool | None] = {
    "true": True,
    "True": True,
    "false": False,
    "False": False,
    "null": None,
    "None": None,
}
_ARITHMETIC: Mapping[type[ast.operator], tuple[str, Callable[..., np.ndarray]]] = {
    ast.Add: ("+", np.add),
    ast.Sub: ("-", np.subtract),
    ast.Mult: ("*", np.multiply),
    ast.Div: ("/", np.true_divide),
    ast.Mod: ("%", np.mod),
}
_REFUSED_OPERATORS: Mapping[type[ast.operator], str] = {
    ast.Pow: "'**' is not allowed (an exponent can blow up); multiply instead, e.g. yaw * yaw",
    ast.FloorDiv: "'//' is not allowed; use /",
    ast.MatMult: "'@' is not allowed",
    ast.BitAnd: "the bit operation '&' is not allowed; use and",
    ast.BitOr: "the bit operation '|' is not allowed; use or",
    ast.BitXor: "the bit operation '^' is not allowed",
    ast.LShift: "the bit operation '<<' is not allowed",
    ast.RShift: "the bit operation '>>' is not allowed",
}
_COMPARISONS: Mapping[type[ast.cmpop], Callable[..., np.ndarray]] = {
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
}
_REFUSED_NODES: Mapping[type[ast.AST], str] = {
    ast.Attribute: "attribute access ('.') is not allowed",
    ast.Subscript: "subscripts ('[...]') are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.NamedExpr: "assignment (':=') is not allowed",
    ast.IfExp: "'if'/'else' is not allowed; combine conditions with and/or",
    ast.Dict: "dicts are not allowed",
    ast.Starred: "'*' unpacking is not allowed",
    ast.List: "a list is only allowed after 'in' / 'not in'",
    ast.Tuple: "a tuple is only allowed after 'in' / 'not in'",
    ast.Set: "a set is only allowed after 'in' / 'not in'",
}
_T = TypeVar("_T")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_KIND_WORDS = {"num": "a number", "text": "text", "bool": "true/false", "null": "all missing"}


class ExpressionError(ValueError):
    """A ``--where`` expression that is refused; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@dataclass(frozen=True)
class Expression:
    """A checked ``--where`` expression; build it with :func:`parse_expression`."""

    text: str
    names: frozenset[str]

    def evaluate(self, columns: Mapping[str, Sequence | np.ndarray], length: int) -> np.ndarray:
        """The rows (of ``length``) the expression selects, as a numpy bool array.

        Only the attributes the expression names are looked up in ``columns``; each must be
        there, one value per row. The text is parsed and checked again here, so an
        :class:`Expression` built by hand is as safe as a parsed one.
        """
        length = operator.index(length)
        if length < 0:
            raise ValueError(f"length must be 0 or more, got {length}")
        tree, names = _check(self.text)
        for name in names:
            if name not in columns:
                raise ExpressionError(_unknown_message(name, columns.keys()))
        values = {name: _column(name, columns[name], length) for name in names}
        result = _guarded(lambda: _Walker(self.text, values, length).condition(tree))
        assert result is not None  # with columns, the walker computes data
        return np.array(result, dtype=bool)


def parse_expression(text: str, known: Iterable[str] | None = None) -> Expression:
    """Parse and check a ``--where`` expression, refusing anything outside the grammar.

    ``known`` is the attribute names that exist; when given, naming any other is an
    :class:`ExpressionError` with a suggestion.
    """
    _, names = _check(text)
    if known is not None:
        known_names = frozenset(known)
        for name in names:
            if name not in known_names:
                raise ExpressionError(_unknown_message(name, known_names))
    return Expression(text=text, names=frozenset(names))


# --- parsing and checking ------------------------------------------------------------------


def _check(text: str) -> tuple[ast.Expression, tuple[str, ...]]:
    """Parse ``text`` and check it without data; the tree and the names it reads, in order."""
    tree = _parse(text)
    _check_size(tree, text)
    walker = _Walker(text)
    _guarded(lambda: walker.condition(tree))
    return tree, tuple(walker.names)


def _parse(text: str) -> ast.Expression:
    if not isinstance(text, str):
        raise ExpressionError(f"--where must be text, got {type(text).__name__}")
    if not text.strip():
        raise ExpressionError("--where is empty; give a condition, e.g. abs(yaw) > 30")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"--where is too long ({len(text)} characters; at most {MAX_LENGTH})")
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(_syntax_message(text, exc)) from None
    except ValueError:
        raise ExpressionError("--where contains a null character") from None
    except (RecursionError, MemoryError):
        raise ExpressionError("--where is nested too deeply") from None


def _syntax_message(text: str, exc: SyntaxError) -> str:
    reason = exc.msg or "invalid syntax"
    if "null bytes" in reason:
        return "--where contains a null character"
    if exc.offset is None or exc.lineno is None:
        return f"--where is not a valid expression: {reason}"
    lines = _LINE_BREAK.split(text)
    line = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else ""
    near = _clip(line[max(exc.offset - 1, 0) :]) or "the end"
    where = f"column {exc.offset}" if len(lines) == 1 else f"line {exc.lineno} column {exc.offset}"
    return (
        f"--where is not a valid expression: {reason}{_syntax_hint(text)}; at {where}, near: {near}"
    )


def _syntax_hint(text: str) -> str:
    """A hint for the usual slips from other languages."""
    if re.search(r"(?<![=!<>])=(?!=)", text):
        return " (compare with ==, not =)"
    if "&&" in text or "||" in text:
        return " (write and / or, not && / ||)"
    if "!" in text.replace("!=", ""):
        return " (write not, not !)"
    return ""


def _check_size(tree: ast.Expression, text: str) -> None:
    """Refuse a tree of more than MAX_NODES expressions or nested more than _MAX_DEPTH deep."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ExpressionError(
                f"--where is nested too deeply (at most {_MAX_DEPTH} levels; "
                "each + - * / % in a row counts as one)"
            )
        if isinstance(node, ast.expr):
            count += 1
        if count > MAX_NODES:
            raise ExpressionError(
                f"--where is too complex (more than {MAX_NODES} parts); simplify it"
            )
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            continue  # an in-list's items are checked flat, and counted apart
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _guarded(work: Callable[[], _T]) -> _T:
    try:
        return work()
    except (RecursionError, MemoryError):
        raise ExpressionError("--where is nested too deeply") from None


# --- values --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    """A value while walking: its kind, and (when evaluating) its data and missing mask.

    kind: ``num`` (float64, NaN where missing), ``bool`` (False where missing), ``text``
    (numpy str, "" where missing), ``null`` (every row missing), or ``any`` (an attribute
    while checking without data). ``data`` / ``missing`` are None while checking.
    """

    kind: str
    desc: str
    data: np.ndarray | None = None
    missing: np.ndarray | None = None
    column: str | None = None
    none_literal: bool = False


def _column(name: str, raw: Sequence | np.ndarray, length: int) -> _Value:
    """One attribute's values, typed for the walker."""
    array = raw if isinstance(raw, np.ndarray) else np.fromiter(raw, dtype=object)
    if array.ndim != 1:
        raise ExpressionError(f"attribute '{name}' must have one value per image")
    if len(array) != length:
        raise ExpressionError(
            f"attribute '{name}' has {len(array)} values but there are {length} images"
        )
    kind = array.dtype.kind
    if kind == "b":
        return _column_value(name, "bool", array.astype(bool), np.zeros(length, dtype=bool))
    if kind in "iuf":
        data = array.astype(np.float64)
        return _column_value(name, "num", data, np.isnan(data))
    if kind == "U":
        return _column_value(name, "text", array, np.zeros(length, dtype=bool))
    if kind == "O":
        return _object_column(name, array)
    raise ExpressionError(f"attribute '{name}' has an unsupported type ({array.dtype})")


def _object_column(name: str, array: np.ndarray) -> _Value:
    missing = np.array([_is_missing(v) for v in array], dtype=bool)
    kinds = {_kind_of(name, v) for v in array[~missing]}
    filled = array.copy()
    if not kinds:
        return _column_value(name, "null", np.full(len(array), np.nan), missing)
    if "text" in kinds and len(kinds) > 1:
        raise ExpressionError(f"attribute '{name}' mixes text and numbers")
    if kinds == {"text"}:
        filled[missing] = ""
        return _column_value(name, "text", filled.astype(str), missing)
    if kinds == {"bool"}:
        filled[missing] = False
        return _column_value(name, "bool", filled.astype(bool), missing)
    filled[missing] = np.nan
    return _column_value(name, "num", filled.astype(np.float64), missing)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def _kind_of(name: str, value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | float | np.integer | np.floating):
        return "num"
    if isinstance(value, str):
        return "text"
    raise ExpressionError(
        f"attribute '{name}' holds a value of unsupported type {type(value).__name__}"
    )


def _column_value(name: str, kind: str, data: np.ndarray, missing: np.ndarray) -> _Value:
    desc = f"the attribute '{name}' ({_KIND_WORDS[kind]})"
    return _Value(kind, desc, data, missing, column=name)


# --- the walker ----------------------------------------------------------------------------


class _Walker:
    """Checks (``columns`` None) or evaluates (``columns`` given) a parsed expression.

    The same code does both, so evaluation can only reach what checking accepted.
    """

    def __init__(
        self, text: str, columns: Mapping[str, _Value] | None = None, length: int = 0
    ) -> None:
        self.text = text
        self.columns = columns
        self.length = length
        self.names: dict[str, None] = {}

    @property
    def checking(self) -> bool:
        return self.columns is None

    def error(self, node: ast.AST, problem: str) -> ExpressionError:
        return ExpressionError(f"{problem}; {_locate(self.text, node)}")

    # the whole expression

    def condition(self, tree: ast.Expression) -> np.ndarray | None:
        value = self.value(tree.body)
        if value.none_literal or value.kind not in ("bool", "null", "any"):
            raise self.error(
                tree.body,
                f"--where must be a condition (a comparison, and/or/not), got {value.desc}",
            )
        return self.truth(value, tree.body, "--where")

    def truth(self, value: _Value, node: ast.expr, context: str) -> np.ndarray | None:
        """A condition's rows (None while checking); anything else is an error."""
        if value.none_literal or value.kind not in ("bool", "null", "any"):
            hint = ""
            if value.column is not None and value.kind == "num":
                hint = f" (write e.g. {value.column} == 1)"
            raise self.error(
                node,
                f"{context} needs conditions (comparisons, and/or/not, true/false "
                f"attributes), got {value.desc}{hint}",
            )
        if self.checking:
            return None
        assert value.data is not None
        if value.kind == "null":
            return np.zeros(self.length, dtype=bool)
        return value.data

    def value(self, node: ast.expr) -> _Value:
        match node:
            case ast.BoolOp():
                return self.bool_op(node)
            case ast.UnaryOp():
                return self.unary_op(node)
            case ast.BinOp():
                return self.bin_op(node)
            case ast.Compare():
                return self.compare(node)
            case ast.Call():
                return self.call(node)
            case ast.Name():
                return self.name(node)
            case ast.Constant():
                return self.literal(node, node.value)
        problem = _REFUSED_NODES.get(type(node), f"{type(node).__name__} is not allowed")
        raise self.error(node, problem)

    # results

    def boolean(self, data: np.ndarray | None) -> _Value:
        missing = None if data is None else np.zeros(self.length, dtype=bool)
        return _Value("bool", "a condition", data, missing)

    def number(self, data: np.ndarray | None) -> _Value:
        missing = None if data is None else np.isnan(data)
        return _Value("num", "arithmetic", data, missing)

    # leaves

    def name(self, node: ast.Name) -> _Value:
        if node.id in _CONSTANT_NAMES:
            return self.literal(node, _CONSTANT_NAMES[node.id])
        if node.id.startswith("__"):
            raise self.error(node, f"the name '{node.id}' is not allowed")
        self.names.setdefault(node.id)
        if self.columns is None:
            return _Value("any", f"the attribute '{node.id}'", column=node.id)
        return self.columns[node.id]

    def literal(self, node: ast.expr, value: object) -> _Value:
        kind = _literal_kind(value)
        if kind is None:
            raise self.error(node, _literal_refusal(value))
        if value is None:
            data = None if self.checking else np.full(self.length, np.nan)
            missing = None if self.checking else np.ones(self.length, dtype=bool)
            return _Value("null", "null", data, missing, none_literal=True)
        dtype = {"num": np.float64, "bool": bool, "text": None}[kind]  # text: as wide as it is
        data = None if self.checking else np.full(self.length, value, dtype=dtype)
        missing = None if self.checking else np.zeros(self.length, dtype=bool)
        return _Value(kind, _literal_desc(value), data, missing)

    # conditions

    def bool_op(self, node: ast.BoolOp) -> _Value:
        word = "'and'" if isinstance(node.op, ast.And) else "'or'"
        parts = [self.truth(self.value(part), part, word) for part in node.values]
        if self.checking:
            return self.boolean(None)
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        return self.boolean(combine.reduce(parts))

    def unary_op(self, node: ast.UnaryOp) -> _Value:
        if isinstance(node.op, ast.Not):
            rows = self.truth(self.value(node.operand), node.operand, "'not'")
            return self.boolean(None if rows is None else ~rows)
        if isinstance(node.op, ast.Invert):
            raise self.error(node, "the bit operation '~' is not allowed; use not")
        symbol = "-" if isinstance(node.op, ast.USub) else "+"
        data = self.numeric(self.value(node.operand), node.operand, symbol)
        if data is None:
            return self.number(None)
        return self.number(-data if symbol == "-" else data)

    # arithmetic

    def bin_op(self, node: ast.BinOp) -> _Value:
        refusal = _REFUSED_OPERATORS.get(type(node.op))
        if refusal is not None or type(node.op) not in _ARITHMETIC:
            raise self.error(node, refusal or f"{type(node.op).__name__} is not allowed")
        symbol, func = _ARITHMETIC[type(node.op)]
        left = self.numeric(self.value(node.left), node.left, symbol)
        right = self.numeric(self.value(node.right), node.right, symbol)
        if left is None or right is None:
            return self.number(None)
        with np.errstate(all="ignore"):
            return self.number(func(left, right))

    def numeric(self, value: _Value, node: ast.expr, symbol: str) -> np.ndarray | None:
        """A number's data (true/false as 1/0, NaN where missing); None while checking."""
        if value.none_literal:
            raise self.error(node, f"null cannot be used in arithmetic ('{symbol}')")
        if value.kind == "text":
            raise self.error(node, _text_in_arithmetic(value, symbol))
        if self.checking or value.kind == "any":
            return None
        assert value.data is not None and value.missing is not None
        if value.kind == "bool":
            return np.where(value.missing, np.nan, value.data.astype(np.float64))
        return value.data

    # comparisons

    def compare(self, node: ast.Compare) -> _Value:
        left = self.value(node.left)
        rows: list[np.ndarray | None] = []
        for index, (op, right_node) in enumerate(zip(node.ops, node.comparators, strict=True)):
            if isinstance(op, ast.In | ast.NotIn):
                if index != len(node.ops) - 1:
                    raise self.error(node, "'in [...]' must come last in a chained comparison")
                rows.append(self.membership(left, right_node, isinstance(op, ast.NotIn), node))
                break
            right = self.value(right_node)
            rows.append(self.pair(op, left, right, node))
            left = right
        if self.checking:
            return self.boolean(None)
        return self.boolean(np.logical_and.reduce(rows))

    def pair(
        self, op: ast.cmpop, left: _Value, right: _Value, node: ast.Compare
    ) -> np.ndarray | None:
        func = _COMPARISONS.get(type(op))
        if func is None:
            raise self.error(node, "'is' is not allowed; use == (or isnull(x) for a missing value)")
        if left.none_literal or right.none_literal:
            return self.null_test(op, right if left.none_literal else left, node)
        self.comparable(left, right, node)
        if self.checking:
            return None
        assert left.missing is not None and right.missing is not None
        if "null" in (left.kind, right.kind):
            return np.zeros(self.length, dtype=bool)
        with np.errstate(all="ignore"):
            rows = func(_comparable_data(left), _comparable_data(right))
        return rows & ~(left.missing | right.missing)

    def null_test(self, op: ast.cmpop, other: _Value, node: ast.Compare) -> np.ndarray | None:
        if not isinstance(op, ast.Eq | ast.NotEq):
            raise self.error(
                node, "null can only be compared with == or != (or use isnull / notnull)"
            )
        if self.checking:
            return None
        assert other.missing is not None
        return other.missing.copy() if isinstance(op, ast.Eq) else ~other.missing

    def comparable(self, left: _Value, right: _Value, node: ast.expr) -> None:
        kinds = {left.kind, right.kind}
        if kinds & {"any", "null"} or kinds <= {"num", "bool"} or kinds == {"text"}:
            return
        text, other = (left, right) if left.kind == "text" else (right, left)
        if text.column is not None:
            raise self.error(node, _text_column_hint(text))
        if other.column is not None:
            raise self.error(node, _number_column_hint(other))
        raise self.error(node, f"cannot compare {text.desc} with {other.desc}")

    def membership(
        self, left: _Value, list_node: ast.expr, negate: bool, node: ast.Compare
    ) -> np.ndarray | None:
        if left.none_literal:
            raise self.error(node, "null cannot be used with 'in'; use isnull / notnull")
        items, kind = self.literal_list(list_node)
        self.comparable(left, _Value(kind, f"a list of {_KIND_WORDS[kind]}"), node)
        if self.checking:
            return None
        assert left.missing is not None
        if left.kind == "null":
            return np.zeros(self.length, dtype=bool)
        dtype = str if kind == "text" else np.float64
        hits = np.isin(_comparable_data(left), np.array(items, dtype=dtype))
        return (~hits if negate else hits) & ~left.missing

    def literal_list(self, node: ast.expr) -> tuple[list[object], str]:
        """The constants of an in-list and their kind (``text`` or ``num``)."""
        if not isinstance(node, ast.List | ast.Tuple | ast.Set):
            raise self.error(
                node,
                '\'in\' needs a list of constants on its right, e.g. hair in ["short", "bald"]',
            )
        if len(node.elts) > _MAX_LIST:
            raise self.error(node, f"an 'in' list has {len(node.elts)} items; at most {_MAX_LIST}")
        items = [self.list_item(item) for item in node.elts]
        kinds = {"text" if isinstance(item, str) else "num" for item in items}
        if len(kinds) > 1:
            raise self.error(node, "an 'in' list mixes text and numbers")
        return items, kinds.pop() if kinds else "num"

    def list_item(self, node: ast.expr) -> object:
        sign = 1
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            sign = -1 if isinstance(node.op, ast.USub) else 1
            node = node.operand
            if not (isinstance(node, ast.Constant) and _literal_kind(node.value) == "num"):
                raise self.error(node, "only a number can follow a sign in an 'in' list")
        if isinstance(node, ast.Name) and node.id in _CONSTANT_NAMES:
            value = _CONSTANT_NAMES[node.id]
        elif isinstance(node, ast.Constant):
            value = node.value
        else:
            raise self.error(node, "the items of an 'in' list must be constants (numbers or text)")
        if value is None:
            raise self.error(node, "null cannot be in an 'in' list; use isnull(x) or ...")
        if _literal_kind(value) is None:  # the same limits as any constant
            raise self.error(node, _literal_refusal(value))
        return -value if sign == -1 else value

    # calls

    def call(self, node: ast.Call) -> _Value:
        function = node.func
        allowed = ", ".join(_FUNCTIONS)
        if not isinstance(function, ast.Name):
            raise self.error(node, f"only the functions {allowed} can be called")
        if function.id not in _FUNCTIONS:
            raise self.error(
                node, f"the function '{function.id}' is not allowed; allowed: {allowed}"
            )
        if node.keywords:
            raise self.error(node, f"{function.id}() takes no keyword arguments")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise self.error(node, f"{function.id}() takes no '*' arguments")
        if function.id in ("isnull", "notnull"):
            return self.null_call(node, function.id)
        return self.math_call(node, function.id)

    def null_call(self, node: ast.Call, function: str) -> _Value:
        args = node.args
        if len(args) != 1 or not isinstance(args[0], ast.Name) or args[0].id in _CONSTANT_NAMES:
            raise self.error(node, f"{function}() takes one attribute name, e.g. {function}(yaw)")
        value = self.name(args[0])
        if self.checking:
            return self.boolean(None)
        assert value.missing is not None
        return self.boolean(value.missing.copy() if function == "isnull" else ~value.missing)

    def math_call(self, node: ast.Call, function: str) -> _Value:
        count = len(node.args)
        if function == "abs" and count != 1:
            raise self.error(node, f"abs() takes one argument, got {count}")
        if function != "abs" and count < 2:
            raise self.error(node, f"{function}() takes two or more arguments, got {count}")
        args = [self.numeric(self.value(arg), arg, f"{function}()") for arg in node.args]
        if any(arg is None for arg in args):
            return self.number(None)
        if function == "abs":
            return self.number(np.abs(args[0]))
        combine = np.minimum if function == "min" else np.maximum
        return self.number(combine.reduce(args))


# --- helpers -------------------------------------------------------------------------------


def _literal_kind(value: object) -> str | None:
    """The kind of an allowed constant; None for a refused one."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "num" if abs(value) <= _MAX_INT else None
    if isinstance(value, float):
        return "num" if math.isfinite(value) else None
    if isinstance(value, str):
        return "text" if len(value) <= _MAX_TEXT else None
    return None


def _literal_refusal(value: object) -> str:
    if isinstance(value, int):
        return "the number is too large (at most 10**15 in size)"
    if isinstance(value, float):
        return "the number is too large"
    if isinstance(value, str):
        return f"the text is too long ({len(value)} characters; at most {_MAX_TEXT})"
    if isinstance(value, bytes):
        return "bytes literals (b'...') are not allowed; use plain text"
    if isinstance(value, complex):
        return "complex numbers are not allowed"
    if value is Ellipsis:
        return "'...' is not allowed"
    return f"a constant of type {type(value).__name__} is not allowed"


def _literal_desc(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the text {_quote(value)}"
    return f"the number {value}"


def _comparable_data(value: _Value) -> np.ndarray:
    assert value.data is not None
    if value.kind == "bool":
        return value.data.astype(np.float64)
    return value.data


def _text_column_hint(value: _Value) -> str:
    name = value.column
    return f"attribute '{name}' is text; compare it with text, e.g. {name} == {_example(value)}"


def _number_column_hint(value: _Value) -> str:
    name = value.column
    if value.kind == "bool":
        return (
            f"attribute '{name}' is true/false; compare it with true or false, e.g. {name} == true"
        )
    return f"attribute '{name}' is a number; compare it with a number, e.g. {name} > 0"


def _text_in_arithmetic(value: _Value, symbol: str) -> str:
    if value.column is None:
        return f"text cannot be used in arithmetic ('{symbol}')"
    return f"{_text_column_hint(value)} (text cannot be used in arithmetic, '{symbol}')"


def _example(value: _Value) -> str:
    """A quoted example value of a text attribute: its first present value, else "short"."""
    if value.data is not None and value.missing is not None and (~value.missing).any():
        return _quote(str(value.data[~value.missing][0])[:30])
    return '"short"'


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _unknown_message(name: str, known: Iterable[str]) -> str:
    names = sorted(known)
    if f"{name}_est" in names:
        return (
            f"'{name}' is not a ground-truth attribute of this source; its estimate is '{name}_est'"
        )
    message = f"unknown attribute '{name}' in --where"
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        message += "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        message += ";"
    shown = ", ".join(names[:40]) or "(none)"
    if len(names) > 40:
        shown += f", ... ({len(names) - 40} more)"
    return f"{message} known: {shown}"


def _locate(text: str, node: ast.AST) -> str:
    """Where ``node`` is in ``text``: ``at column C of --where: <its text>``."""
    segment = ast.get_source_segment(text, node) or type(node).__name__
    lineno = getattr(node, "lineno", 1)
    lines = _LINE_BREAK.split(text)
    line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    offset = getattr(node, "col_offset", 0)
    column = len(line.encode()[:offset].decode(errors="ignore")) + 1
    where = f"column {column}" if len(lines) == 1 else f"line {lineno} column {column}"
    return f"at {where} of --where: {_clip(segment)}"


def _clip(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(message: str) -> str:
    """``message`` with line breaks and other unprintable characters made spaces."""
    return "".join(ch if ch.isprintable() else " " for ch in str(message))
