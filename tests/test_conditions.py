"""Tests of Azure Pipelines condition expressions judged against a response body."""

from __future__ import annotations

import pytest

from worker.contract.conditions import Condition, ConditionError, compile_condition

BODY: dict[str, object] = {
    "status": "successful",
    "count": 3,
    "n": 11,
    "ratio": 0.5,
    "name": "release-42",
    "list": ["a", "b", "c"],
    "numbers": [1, 2, 3],
    "a": {"b": [1, 2, {"c": "deep"}]},
    "s": "it's",
    "empty": "",
    "zero": 0,
    "nothing": None,
    "no": False,
    "emptyList": [],
    "emptyObject": {},
    "Mixed": "case",
    "dashed-name": "ok",
}

# (condition, expected truth against BODY)
CASES: list[tuple[str, str, bool]] = [
    # Azure's documented examples
    ("eq-numbers", "eq(1, 2)", False),
    ("eq-ignores-case", "eq('abc', 'ABC')", True),
    ("ne", "ne(1, 2)", True),
    ("gt", "gt(5, 2)", True),
    ("ge-equal", "ge(5, 5)", True),
    ("lt", "lt(5, 2)", False),
    ("le-equal", "le(5, 5)", True),
    ("and", "and(True, False)", False),
    ("and-variadic", "and(true, TRUE, 1, 'x')", True),
    ("or", "or(True, False)", True),
    ("or-variadic", "or(false, 0, '', True)", True),
    ("not", "not(False)", True),
    ("xor", "xor(True, False)", True),
    ("xor-both", "xor(True, True)", False),
    ("contains", "contains('ABCDE', 'BCD')", True),
    ("contains-ignores-case", "contains('ABCDE', 'bcd')", True),
    ("contains-number", "contains('a12b', 12)", True),
    ("contains-missing", "contains('ABCDE', 'X')", False),
    ("containsValue", "containsValue(root['list'], 'b')", True),
    ("containsValue-ignores-case", "containsValue(root['list'], 'B')", True),
    ("containsValue-absent", "containsValue(root['list'], 'z')", False),
    ("containsValue-casts", "containsValue(root['numbers'], '2')", True),
    ("containsValue-object", "containsValue(root['a'], 'x')", False),
    ("containsValue-not-collection", "containsValue('abc', 'abc')", False),
    ("startsWith", "startsWith('ABCDE', 'AB')", True),
    ("startsWith-ignores-case", "startsWith('ABCDE', 'ab')", True),
    ("endsWith", "endsWith('ABCDE', 'DE')", True),
    ("endsWith-not", "endsWith('ABCDE', 'AB')", False),
    ("in", "in('B', 'A', 'B', 'C')", True),
    ("in-absent", "in('D', 'A', 'B', 'C')", False),
    ("notIn", "notIn('D', 'A', 'B', 'C')", True),
    ("notIn-present", "notIn('a', 'A', 'B')", False),
    ("join", "eq(join(';', root['list']), 'a;b;c')", True),
    ("join-numbers", "eq(join(', ', root['numbers']), '1, 2, 3')", True),
    ("join-not-array", "eq(join(';', 'abc'), 'abc')", True),
    ("format", "eq(format('{0}-{1}', 'a', 1), 'a-1')", True),
    ("format-escapes", "eq(format('{{{0}}}', 'x'), '{x}')", True),
    ("format-specifier-kept", "eq(format('{0:yyyy}', 'x'), '{0:yyyy}')", True),
    ("format-missing-argument", "eq(format('[{1}]', 'x'), '[]')", True),
    ("coalesce", "coalesce(root['missing'], '', 'x')", True),
    ("coalesce-value", "eq(coalesce(root['missing'], '', 'x'), 'x')", True),
    ("coalesce-none", "coalesce(root['missing'], '')", False),
    ("length-array", "eq(length(root['list']), 3)", True),
    ("length-string", "eq(length('abcd'), 4)", True),
    ("length-object", "eq(length(root.a), 1)", True),
    ("length-null", "eq(length(root.missing), 0)", True),
    ("iif-true", "eq(iif(eq(1, 1), 'yes', 'no'), 'yes')", True),
    ("iif-false", "eq(iif(eq(1, 2), 'yes', 'no'), 'no')", True),
    ("split", "eq(split('a,b', ',')[1], 'b')", True),
    ("split-length", "eq(length(split('a,b,,c', ',')), 4)", True),
    ("replace", "eq(replace('aXb', 'X', '-'), 'a-b')", True),
    ("replace-is-case-sensitive", "eq(replace('aXb', 'x', '-'), 'aXb')", True),
    ("lower", "eq(lower('AbC'), 'abc')", True),
    ("upper", "startsWith(upper('abc'), 'ABC')", True),
    ("trim", "eq(length(trim('  ab  ')), 2)", True),
    ("convertToJson", "contains(convertToJson(root['list']), '\"b\"')", True),
    ("function-names-ignore-case", "EQ(1, 1)", True),
    # Casting the right operand to the left's type
    ("number-vs-string", "eq(root['count'], '3')", True),
    ("string-vs-number", "eq('3', root['count'])", True),
    ("string-vs-float", "eq('0.5', root['ratio'])", True),
    ("number-vs-padded-string", "eq(root['count'], ' 3 ')", True),
    ("number-vs-bad-string", "eq(root['count'], 'three')", False),
    ("ne-bad-cast", "ne(root['count'], 'three')", True),
    ("gt-bad-cast", "gt(root['count'], 'three')", False),
    ("lt-bad-cast", "lt(root['count'], 'three')", False),
    ("gt-numeric-string", "gt(root['n'], '10')", True),
    ("gt-string-compares-text", "gt('11', '10')", True),
    ("string-order-ignores-case", "lt('apple', 'BANANA')", True),
    ("bool-vs-string", "eq(True, 'true')", True),
    ("bool-vs-nonempty-string", "eq(True, 'false')", True),
    ("bool-vs-empty-string", "eq(False, '')", True),
    ("bool-vs-number", "eq(True, 2)", True),
    ("string-vs-bool", "eq('True', true)", True),
    ("number-vs-bool", "eq(1, true)", True),
    ("number-vs-null", "eq(0, root.missing)", True),
    ("string-vs-null", "eq('', root.missing)", True),
    ("null-vs-null", "eq(root.missing, null)", True),
    ("null-vs-empty-string", "eq(root.missing, '')", True),
    ("null-vs-zero", "eq(root.missing, 0)", False),
    ("number-vs-empty-string", "eq(0, '')", True),
    ("integral-float-as-string", "eq('1', 1.0)", True),
    ("hex-literal", "eq(0x1F, 31)", True),
    ("hex-string", "eq(31, '0x1f')", True),
    ("negative-float", "lt(-1.5, -1)", True),
    ("leading-dot", "eq(.5, root.ratio)", True),
    ("array-vs-string", "eq(root['list'], 'a')", False),
    ("array-vs-itself", "eq(root['list'], root.list)", True),
    ("array-has-no-order", "gt(root['list'], 1)", False),
    # Response bodies
    ("status", "eq(root['status'], 'successful')", True),
    ("status-other", "eq(root['status'], 'failed')", False),
    ("and-of-checks", "and(ge(root['count'], 1), startsWith(root['name'], 'rel'))", True),
    ("deep-index", "eq(root['a']['b'][1], 2)", True),
    ("deep-dots", "eq(root.a.b[2].c, 'deep')", True),
    ("index-by-numeric-string", "eq(root.a.b['0'], 1)", True),
    ("dashed-property", "eq(root.dashed-name, 'ok')", True),
    ("property-ignores-case", "eq(root.mixed, 'case')", True),
    ("whitespace", "  eq (  root [ 'count' ] ,\n 3 )  ", True),
    ("escaped-quote", "eq(root['s'], 'it''s')", True),
    ("missing-property", "eq(root['missing'], null)", True),
    ("missing-deep", "eq(root.missing.deeper[3], null)", True),
    ("index-out-of-range", "eq(root.list[3], null)", True),
    ("negative-index", "eq(root.list[-1], null)", True),
    ("fractional-index", "eq(root.list[0.5], null)", True),
    ("index-into-string", "eq(root.status[0], null)", True),
    ("short-circuit-and", "and(false, eq(root.missing.x, 1))", False),
    # Truthiness of the final value
    ("truthy-root", "root", True),
    ("truthy-string", "root.status", True),
    ("truthy-number", "root.count", True),
    ("truthy-empty-array", "root.emptyList", True),
    ("truthy-empty-object", "root.emptyObject", True),
    ("truthy-string-false", "'false'", True),
    ("falsy-empty-string", "root.empty", False),
    ("falsy-zero", "root.zero", False),
    ("falsy-negative-zero", "-0", False),
    ("falsy-null", "root.nothing", False),
    ("falsy-missing", "root.missing", False),
    ("falsy-false", "root.no", False),
    ("falsy-null-literal", "null", False),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_condition_holds(text: str, expected: bool) -> None:
    assert compile_condition(text).holds(BODY) is expected


# (body, expected truth of `root`)
TRUTHINESS: list[tuple[str, object, bool]] = [
    ("true", True, True),
    ("false", False, False),
    ("null", None, False),
    ("zero", 0, False),
    ("float-zero", 0.0, False),
    ("negative-zero", -0.0, False),
    ("nan", float("nan"), False),
    ("number", -1, True),
    ("empty-string", "", False),
    ("string", "0", True),
    ("empty-array", [], True),
    ("empty-object", {}, True),
]


@pytest.mark.parametrize(
    ("body", "expected"), [t[1:] for t in TRUTHINESS], ids=[t[0] for t in TRUTHINESS]
)
def test_truthiness(body: object, expected: bool) -> None:
    assert compile_condition("root").holds(body) is expected
    assert compile_condition("not(root)").holds(body) is not expected


# (condition, expected message)
ERRORS: list[tuple[str, str, str]] = [
    ("unknown-function", "equals(1, 1)", "unknown function 'equals' at column 1"),
    ("unknown-nested", "and(true, foo(1))", "unknown function 'foo' at column 11"),
    ("unclosed-paren", "eq(root['a'], 1", "expected ')' at column 16"),
    ("missing-comma", "eq(1 2)", "expected ')' at column 6"),
    ("too-few", "eq(1)", "'eq' takes 2 arguments, not 1 at column 1"),
    ("too-many", "not(1, 2)", "'not' takes 1 arguments, not 2 at column 1"),
    ("variadic-too-few", "and(true)", "'and' takes at least 2 arguments, not 1 at column 1"),
    ("stray-token", "eq(1, 1) x", "unexpected 'x' at column 10"),
    ("stray-paren", "eq(1, 1))", "unexpected ')' at column 9"),
    ("unterminated-string", "eq('abc, 1)", "unterminated string at column 4"),
    ("empty", "", "expected an expression at column 1"),
    ("blank", "   ", "expected an expression at column 4"),
    ("missing-argument", "eq(1, )", "expected an expression at column 7"),
    ("unclosed-index", "root['a'", "expected ']' at column 9"),
    ("bare-name", "eq(status, 1)", "unknown name 'status' at column 4"),
    ("bad-number", "eq(1.2.3, 1)", "invalid number '1.2.3' at column 4"),
    ("bad-property", "root.", "expected a property name at column 6"),
    ("bad-character", "eq(1, #)", "unexpected '#' at column 7"),
    ("too-deep", "not(" * 60 + "true" + ")" * 60, "nesting deeper than 50 at column 205"),
]


@pytest.mark.parametrize(("text", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_compile_errors(text: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition(text)
    assert str(caught.value) == message


def test_condition_error_is_value_error() -> None:
    assert issubclass(ConditionError, ValueError)


def test_compiled_once_and_shared() -> None:
    first = compile_condition("eq(root.count, 3)")
    assert first is compile_condition("eq(root.count, 3)")
    assert first == Condition("eq(root.count, 3)", lambda _root: None)
    assert first.source == "eq(root.count, 3)"


@pytest.mark.parametrize(
    ("body", "expected"),
    [({"status": "SUCCESSFUL"}, True), ({"status": "failed"}, False), ([], False), (None, False)],
    ids=["matching", "other-status", "array-body", "null-body"],
)
def test_same_condition_across_bodies(body: object, expected: bool) -> None:
    assert compile_condition("eq(root.status, 'successful')").holds(body) is expected
