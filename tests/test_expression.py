from __future__ import annotations

import builtins
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest

from digi2real.data.expression import (
    MAX_LENGTH,
    MAX_NODES,
    Expression,
    ExpressionError,
    parse_expression,
)

NAN = np.nan


@pytest.fixture()
def columns() -> dict[str, object]:
    """Five images; the third has nothing but a pitch."""
    return {
        "yaw": np.array([-40.0, 10.0, NAN, 50.0, 0.0]),
        "pitch": np.array([0.0, 0.0, 5.0, 20.0, -3.0]),
        "hair": ["short", "long", None, "bald", "long"],
        "glasses": np.array([True, False, False, True, False]),
        "smile": [True, None, None, False, True],
        "face_size_est": np.array([30, 80, 50, 39, 40]),
        "zero": np.zeros(5),
        "nothing": [None] * 5,
    }


def rows(text: str, columns: Mapping[str, object], length: int = 5) -> list[bool]:
    result = parse_expression(text, known=columns.keys()).evaluate(columns, length)
    assert result.dtype == np.bool_ and result.shape == (length,)
    return result.tolist()


def message(text: str, columns: Mapping[str, object] | None = None, length: int = 5) -> str:
    with pytest.raises(ExpressionError) as info:
        expression = parse_expression(text, known=None if columns is None else columns.keys())
        expression.evaluate(columns or {}, length)
    text_of = str(info.value)
    assert "\n" not in text_of and "\r" not in text_of
    return text_of


# --- evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abs(yaw) > 30 and pitch < 10", [True, False, False, False, False]),
        ("yaw > 5 or pitch > 4", [False, True, True, True, False]),
        ("yaw + pitch * 2 > 60", [False, False, False, True, False]),
        ("yaw - 10 == 0", [False, True, False, False, False]),
        ("yaw / 10 >= 5", [False, False, False, True, False]),
        ("yaw % 7 == 3", [False, True, False, False, False]),
        ("-yaw > 30", [True, False, False, False, False]),
        ("+yaw == 50", [False, False, False, True, False]),
        ("not (face_size_est < 40)", [False, True, True, False, True]),
        ("face_size_est <= 40 and face_size_est >= 39", [False, False, False, True, True]),
        ("yaw != 10", [True, False, False, True, True]),
    ],
)
def test_numeric_conditions(columns, text: str, expected: list[bool]) -> None:
    assert rows(text, columns) == expected


def test_chained_comparison_is_a_conjunction(columns) -> None:
    assert rows("-30 < yaw < 30", columns) == [False, True, False, False, True]
    assert rows("-30 < yaw < 30 == 30", columns) == [False, True, False, False, True]
    assert rows("-30 < yaw < 30 == 31", columns) == [False] * 5
    assert rows("0 <= yaw <= 50 != pitch", columns) == [False, True, False, True, True]
    assert rows("-41 < yaw < 51", columns) == rows("-41 < yaw and yaw < 51", columns)


def test_in_lists(columns) -> None:
    assert rows('hair in ["short", "bald"]', columns) == [True, False, False, True, False]
    assert rows("hair in ('long',)", columns) == [False, True, False, False, True]
    assert rows("hair in {'long'}", columns) == [False, True, False, False, True]
    assert rows('hair not in ["short"]', columns) == [False, True, False, True, True]
    assert rows("yaw in [-40, 50.0, +0]", columns) == [True, False, False, True, True]
    assert rows("yaw not in [10]", columns) == [True, False, False, True, True]
    assert rows("yaw in []", columns) == [False] * 5
    assert rows("glasses in [1]", columns) == [True, False, False, True, False]
    assert rows("glasses in [true]", columns) == [True, False, False, True, False]
    assert rows("abs(yaw) in [40, 50]", columns) == [True, False, False, True, False]


def test_in_list_items_do_not_count_as_nodes(columns) -> None:
    text = "yaw in [" + "0," * 990 + "]"
    assert len(text) <= MAX_LENGTH
    assert rows(text, columns) == [False, False, False, False, True]


def test_min_max_abs_are_elementwise(columns) -> None:
    assert rows("max(yaw, pitch) > 15", columns) == [False, False, False, True, False]
    assert rows("min(yaw, pitch, 0) < 0", columns) == [True, False, False, False, True]
    assert rows("max(abs(yaw), abs(pitch)) >= 20", columns) == [True, False, False, True, False]
    # a missing argument makes min/max missing, so the comparison is false
    assert rows("max(yaw, 100) == 100", columns) == [True, True, False, True, True]
    assert rows("abs(-3) == 3", columns) == [True] * 5


def test_missing_values(columns) -> None:
    # every comparison with a missing value is false, != included
    assert rows("yaw > -1000", columns) == [True, True, False, True, True]
    assert rows("yaw != 12345", columns) == [True, True, False, True, True]
    assert rows("hair != 'short'", columns) == [False, True, False, True, True]
    # and not does not undo that: two-valued logic
    assert rows("not (yaw > 30)", columns) == [True, True, True, False, True]
    assert rows("isnull(yaw)", columns) == [False, False, True, False, False]
    assert rows("notnull(yaw)", columns) == [True, True, False, True, True]
    assert rows("isnull(hair)", columns) == [False, False, True, False, False]
    assert rows("notnull(smile)", columns) == [True, False, False, True, True]
    assert rows("yaw == null", columns) == rows("isnull(yaw)", columns)
    assert rows("None != hair", columns) == rows("notnull(hair)", columns)
    assert rows("nothing > 3 or nothing == 'x'", columns) == [False] * 5
    assert rows("isnull(nothing)", columns) == [True] * 5
    assert rows("yaw + 1 > 0", columns) == [False, True, False, True, True]


def test_bool_columns(columns) -> None:
    assert rows("glasses", columns) == [True, False, False, True, False]
    assert rows("not glasses", columns) == [False, True, True, False, True]
    assert rows("glasses == 1", columns) == [True, False, False, True, False]
    assert rows("glasses == true and yaw > 0", columns) == [False, False, False, True, False]
    assert rows("glasses or yaw == 10", columns) == [True, True, False, True, False]
    assert rows("(yaw > 0) + glasses >= 2", columns) == [False, False, False, True, False]
    # a missing true/false value is false as a condition, and in comparisons
    assert rows("smile", columns) == [True, False, False, False, True]
    assert rows("not smile", columns) == [False, True, True, True, False]
    assert rows("smile == false", columns) == [False, False, False, True, False]


def test_text_ordering(columns) -> None:
    assert rows("hair < 'm'", columns) == [False, True, False, True, True]
    assert rows("'a' < hair <= 'long'", columns) == [False, True, False, True, True]


def test_division_by_zero_is_silent(columns) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rows("yaw / zero > 1", columns) == [False, True, False, True, False]
        assert rows("yaw / zero < 0", columns) == [True, False, False, False, False]
        # 0/0 is nan: every comparison false, even !=
        assert rows("yaw / zero != 1", columns) == [True, True, False, True, False]
        assert rows("yaw % zero == 0", columns) == [False] * 5
        assert rows("1e300 * 1e300 > 0", columns) == [True] * 5


def test_constant_expressions_broadcast(columns) -> None:
    assert rows("1 < 2", columns) == [True] * 5
    assert rows("true", columns) == [True] * 5
    assert rows("False", columns) == [False] * 5
    assert rows("'a' == 'a' and not false", columns) == [True] * 5
    assert parse_expression("1 < 2").evaluate({}, 0).shape == (0,)
    assert rows("yaw > 0", {"yaw": np.array([])}, length=0) == []


def test_columns_of_every_shape() -> None:
    plain = {
        "ints": np.array([1, 2, 3], dtype=np.int32),
        "uints": np.array([1, 2, 3], dtype=np.uint8),
        "list_floats": [1.5, None, float("nan")],
        "mixed_numbers": [1, 2.5, True],
        "numpy_text": np.array(["a", "b", "c"]),
        "object_text": np.array(["a", None, float("nan")], dtype=object),
        "numpy_scalars": [np.float32(1.0), np.int64(2), None],
    }
    assert rows("ints + uints == 2 * ints", plain, 3) == [True, True, True]
    assert rows("list_floats > 1", plain, 3) == [True, False, False]
    assert rows("mixed_numbers >= 1", plain, 3) == [True, True, True]
    assert rows("numpy_text in ['a', 'c']", plain, 3) == [True, False, True]
    assert rows("isnull(object_text)", plain, 3) == [False, True, True]
    assert rows("numpy_scalars == 2", plain, 3) == [False, True, False]


def test_names_and_immutability() -> None:
    expression = parse_expression("abs(yaw) > 30 and hair in ['a'] and true or isnull(age)")
    assert expression.names == frozenset({"yaw", "hair", "age"})
    assert expression.text == "abs(yaw) > 30 and hair in ['a'] and true or isnull(age)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.text = "1 < 2"  # type: ignore[misc]


def test_only_named_columns_are_read(columns) -> None:
    class Strict(dict):
        def __getitem__(self, key: str) -> object:
            if key == "pitch":
                raise AssertionError("pitch was read")
            return super().__getitem__(key)

    assert parse_expression("yaw > 0").evaluate(Strict(columns), 5).tolist() == [
        False,
        True,
        False,
        True,
        False,
    ]


# --- hostile expressions ---------------------------------------------------------------------

HOSTILE = [
    "__import__('os').system('x')",
    "__import__('os')",
    "open('/etc/passwd').read()",
    "open('/etc/passwd')",
    "eval('1') == 1",
    "exec('import os')",
    "getattr(yaw, '__class__') == 1",
    "globals()",
    "yaw.__class__",
    "yaw.__class__ == 1",
    "().__class__.__bases__[0].__subclasses__()",
    "yaw[0] > 1",
    "hair[0:1] == 'a'",
    "(lambda: 1)() == 1",
    "[x for x in yaw] == 1",
    "{x for x in yaw}",
    "(x for x in yaw)",
    "{k: 1 for k in yaw}",
    "f'{yaw}' == '1'",
    "f'{__import__(\"os\").system(\"x\")}' == ''",
    "(y := 1) == 1",
    "yaw if pitch else pitch",
    "{'a': 1} == yaw",
    "yaw ** 2 > 1",
    "2 ** 2 ** 2 ** 2 ** 2 ** 2 > 1",
    "yaw & 1",
    "yaw | pitch",
    "yaw ^ 1 > 0",
    "~yaw > 0",
    "yaw << 2 > 0",
    "yaw // 2 > 1",
    "yaw is None",
    "yaw is not None",
    "b'x' == hair",
    "1j == yaw",
    "... == yaw",
    "abs(yaw, key=1) > 0",
    "max(*yaw) > 0",
    "abs(*[yaw]) > 0",
    "max(**{'a': 1}) > 0",
    "abs(yaw, pitch) > 1",
    "min(yaw) > 1",
    "isnull(yaw + 1)",
    "isnull()",
    "__builtins__ == 1",
    "yaw in hair",
    "yaw in [pitch]",
    "yaw in [abs(1)]",
    "yaw in [[1]]",
    "yaw in [None]",
    "yaw in [1, 'a']",
    "yaw in [1] == pitch",
    "[1, 2] == yaw",
    "(1, 2)",
    "yaw + 1",
    "abs(yaw)",
    "5",
    "'text'",
    "null",
    "yaw > 1 and 5",
    "not yaw + 1",
    "'a' < 1",
    "'a' + 'b' == 'ab'",
    "hair * 3 == 'x'",
    "null < yaw",
    "null + 1 > 0",
    "-'a' == 1",
    "10000000000000000 > yaw",
    "1e999 > yaw",
    "hair == '" + "x" * 201 + "'",
    "yaw = 3",
    "yaw > 1 && pitch < 2",
    "",
    "   ",
    "yaw > 1; import os",
    "import os",
    "a\x00b",
    "await yaw",
    "(yield)",
]


class Tripwire(Mapping[str, object]):
    """Columns that fail the test if anything reads them."""

    def __getitem__(self, key: str) -> object:
        raise AssertionError(f"column {key!r} was read")

    def __contains__(self, key: object) -> bool:
        raise AssertionError(f"column {key!r} was looked up")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("columns were listed")

    def __len__(self) -> int:
        raise AssertionError("columns were counted")


class Ran(BaseException):
    """Raised by a booby-trapped builtin; a BaseException, so no except clause swallows it."""


def refused_with_builtins_trapped(monkeypatch, work: Callable[[], object]) -> ExpressionError:
    """Run ``work`` with import, open, eval, exec, os.system ... booby-trapped; its refusal."""
    calls: list[str] = []

    def trap(*args: object, **kwargs: object) -> None:
        calls.append(args[0] if args and isinstance(args[0], str) else "?")
        raise Ran(f"called with {calls[-1]!r}")

    refusal = None
    real_import = builtins.__import__
    with monkeypatch.context() as patch:
        patch.setattr(os, "system", trap)
        for name in ("open", "eval", "exec", "input"):
            patch.setattr(builtins, name, trap)
        builtins.__import__ = trap  # by hand: monkeypatch itself imports
        try:
            work()
        except ExpressionError as exc:
            refusal = exc
        finally:
            builtins.__import__ = real_import
    assert calls == []
    assert refusal is not None, "the expression was accepted"
    return refusal


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_expressions_are_refused_before_anything_runs(monkeypatch, text: str) -> None:
    refusal = refused_with_builtins_trapped(monkeypatch, lambda: parse_expression(text))
    assert isinstance(refusal, ValueError)
    assert "\n" not in str(refusal)
    # an Expression built by hand is checked again before any column is touched
    by_hand = Expression(text=text, names=frozenset())
    refused_with_builtins_trapped(monkeypatch, lambda: by_hand.evaluate(Tripwire(), 3))


def test_the_trap_works(monkeypatch) -> None:
    def sneaky() -> None:
        __import__("os")

    with pytest.raises(Ran):
        refused_with_builtins_trapped(monkeypatch, sneaky)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("yaw ** 2 > 1", ["'**' is not allowed", "exponent can blow up", "yaw ** 2"]),
        ("__import__('os').system('x')", ["only the functions abs, min, max", "__import__"]),
        ("open('/etc/passwd')", ["function 'open' is not allowed", "open('/etc/passwd')"]),
        ("pitch > 0 and yaw.__class__", ["attribute access", "column 15", "yaw.__class__"]),
        ("yaw[0] > 1", ["subscripts", "yaw[0]"]),
        ("(lambda: 1)() == 1", ["only the functions"]),
        ("yaw > (lambda: 1)", ["lambda is not allowed", "lambda: 1"]),
        ("[x for x in yaw] == 1", ["comprehensions", "[x for x in yaw]"]),
        ("f'{yaw}' == '1'", ["f-strings"]),
        ("(y := 1) == 1", ["':='", "y := 1"]),
        ("yaw & 1 > 0", ["'&'", "use and"]),
        ("yaw + 1", ["--where must be a condition (a comparison, and/or/not), got arithmetic"]),
        ("yaw > 1 and pitch + 1", ["'and' needs conditions", "got arithmetic", "pitch + 1"]),
        ("10000000000000000 > yaw", ["too large"]),
        ("b'x' == hair", ["bytes"]),
        ("yaw is None", ["'is' is not allowed", "isnull"]),
        ("yaw in hair", ["'in' needs a list of constants"]),
        ("yaw in [None]", ["isnull"]),
        ("null < yaw", ["null can only be compared with == or !="]),
        ("yaw = 3", ["not a valid expression", "=="]),
        ("yaw > 1 && pitch < 2", ["not a valid expression", "and / or"]),
        ("'a' < 1", ['cannot compare the text "a" with the number 1']),
        ("((yaw >\n 1) and\n (pitch ** 2 > 1))", ["line 3 column 3", "pitch ** 2"]),
    ],
)
def test_refusals_say_what_and_where(text: str, words: list[str]) -> None:
    refused = message(text)
    for word in words:
        assert word in refused


def test_a_refused_name_is_never_looked_up() -> None:
    # the refusal comes from the text alone: the columns are never consulted
    for text in ("yaw.__class__ == 1", "__import__('os')", "yaw ** 2 > 0"):
        with pytest.raises(ExpressionError):
            Expression(text=text, names=frozenset({"yaw"})).evaluate(Tripwire(), 3)


# --- limits ----------------------------------------------------------------------------------


def test_length_limit() -> None:
    assert parse_expression("yaw > 1" + " " * (MAX_LENGTH - 7)).names == {"yaw"}
    refused = message("yaw > 1" + " " * (MAX_LENGTH - 6))
    assert "too long" in refused and str(MAX_LENGTH) in refused


def test_node_limit() -> None:
    text = " or ".join(["a > 0"] * (MAX_NODES // 3 + 1))
    assert len(text) <= MAX_LENGTH
    assert "too complex" in message(text)
    assert parse_expression(" or ".join(["a > 0"] * (MAX_NODES // 3 - 1))).names == {"a"}


@pytest.mark.parametrize(
    "text",
    [
        "(" * 10000,
        "(" * 10000 + "yaw > 1" + ")" * 10000,
        "(" * 900 + "yaw > 1" + ")" * 900,
        "[" * 999 + "]" * 999,
        "-" * 1999 + "1",
        "not " * 450 + "true",
        "a" + " + a" * 300 + " > 0",
        "abs(" * 300 + "a" + ")" * 300 + " > 0",
    ],
)
def test_deep_nesting_is_refused_cleanly(text: str) -> None:
    refused = message(text)
    assert refused.startswith("--where")


def test_reasonable_nesting_is_fine(columns) -> None:
    assert rows("(" * 50 + "yaw > 0" + ")" * 50, columns) == [False, True, False, True, False]
    assert rows("not " * 40 + "glasses", columns) == [True, False, False, True, False]
    assert rows("abs(" * 40 + "yaw" + ")" * 40 + " > 45", columns) == [
        False,
        False,
        False,
        True,
        False,
    ]


# --- names and types -------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches() -> None:
    refused = message("yawn > 3", {"yaw": [], "pitch": [], "hair": []})
    assert (
        refused
        == "unknown attribute 'yawn' in --where; did you mean 'yaw'? known: hair, pitch, yaw"
    )
    refused = message("zzz > 3", {"yaw": [], "pitch": []})
    assert refused == "unknown attribute 'zzz' in --where; known: pitch, yaw"


def test_unknown_name_hints_at_the_estimate() -> None:
    refused = message("abs(yaw) > 30", {"yaw_est": [], "pitch": []})
    assert refused == (
        "'yaw' is not a ground-truth attribute of this source; its estimate is 'yaw_est'"
    )


def test_unknown_name_at_evaluate_names_it(columns) -> None:
    expression = parse_expression("yaw > 1 and roll < 3")
    assert expression.names == {"yaw", "roll"}
    with pytest.raises(ExpressionError, match="unknown attribute 'roll' in --where"):
        expression.evaluate(columns, 5)
    with pytest.raises(ExpressionError, match="did you mean 'yaw'"):
        parse_expression("yam > 1").evaluate(columns, 5)


def test_known_names_may_be_any_iterable() -> None:
    assert parse_expression("yaw > 1", known=iter(["yaw"])).names == {"yaw"}
    with pytest.raises(ExpressionError, match="unknown attribute 'yaw'"):
        parse_expression("isnull(yaw)", known=())


def test_text_compared_with_a_number(columns) -> None:
    refused = message("hair > 3", columns)
    assert "attribute 'hair' is text; compare it with text, e.g. hair == \"short\"" in refused
    assert "attribute 'hair' is text" in message("3 == hair", columns)
    assert "attribute 'hair' is text" in message("hair + 1 > 3", columns)
    assert "attribute 'hair' is text" in message("hair in [1, 2]", columns)
    assert "attribute 'yaw' is a number" in message("yaw == 'left'", columns)
    assert "attribute 'yaw' is a number" in message("yaw in ['left']", columns)
    assert "attribute 'glasses' is true/false" in message("glasses == 'yes'", columns)
    assert "attribute 'hair' is text" in message("hair < yaw", columns)


def test_non_conditions_at_evaluate(columns) -> None:
    assert "got the attribute 'yaw' (a number)" in message("yaw", columns)
    assert "got the attribute 'hair' (text)" in message("hair", columns)
    assert "'and' needs conditions" in message("yaw and glasses", columns)
    assert "write e.g. yaw == 1" in message("not yaw", columns)


def test_bad_columns(columns) -> None:
    assert "has 3 values but there are 5 images" in message("yaw > 0", {"yaw": [1, 2, 3]})
    assert "one value per image" in message("yaw > 0", {"yaw": np.zeros((5, 2))})
    assert "mixes text and numbers" in message("x == 1", {"x": [1, "a", None, 2, 3]})
    assert "unsupported" in message("x == 1", {"x": [1, [2], None, 2, 3]})
    assert "unsupported" in message("x == 1", {"x": np.zeros(5, dtype=complex)})
    with pytest.raises(ValueError, match="length"):
        parse_expression("1 < 2").evaluate({}, -1)


def test_error_messages_are_one_line() -> None:
    weird = {"a\nb": [], "yaw": []}
    assert "\n" not in message("c > 1", weird)
    assert "\n" not in message("(yaw\n>\n'a\\nb' ** 2)")
    assert "\n" not in message("yaw > 1 and (\n\n\n")
    assert "\n" not in str(ExpressionError("two\nlines\r\nhere\u2028too"))
