"""The filter language of ``pipeproxy inspect``: what each term picks, printing back, and errors."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeproxy.inspect.filters import OPERATORS, And, FilterError, Not, Or, Term, parse, quote

import inspect_log
from inspect_log import LINES, OLD_TRANSACTION

TRANSACTIONS = [line for line in LINES if line["event"] == "transaction"]


def picked(expression: str, records=None) -> list[tuple[str, str]]:
    """(session's first 4 hex, time) of each transaction the filter picks."""
    test = parse(expression)
    return [(r["session"][:4], r["timestamp"][17:19]) for r in (records or TRANSACTIONS) if test(r)]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("~from alice", [("3f2a", "02"), ("3f2a", "03")]),
        ("~from ^ALICE@", [("3f2a", "02"), ("3f2a", "03")]),  # searched, ignoring case
        ("~to nobody@dest", [("3f2a", "02")]),
        ("~to @other\\.test$", [("3f2a", "03")]),
        ("~client 127.0.0.0/8", [("3f2a", "02"), ("3f2a", "03")]),
        ("~client 127.0.0.2", [("3f2a", "02"), ("3f2a", "03")]),
        ("~client ::1/128", [("0a1b", "02"), ("0a1b", "04")]),
        ("~client 10.0.0.0/8", [("99aa", "03")]),
        ("~client :5555$", [("99aa", "03")]),  # not a network: a regular expression
        ("~helo ^v6\\.", [("0a1b", "02"), ("0a1b", "04")]),
        ("~session 3f2a9c1b7d0e", [("3f2a", "02"), ("3f2a", "03")]),
        ("~session 0A1B", [("0a1b", "02"), ("0a1b", "04")]),
        ("~code 550", [("3f2a", "02")]),  # a recipient's code
        ("~code 5xx", [("3f2a", "02"), ("3f2a", "03")]),
        ("~code 55x", [("3f2a", "02"), ("3f2a", "03")]),
        ("~code 4xx", [("99aa", "03")]),
        ("~code 250 & !~code 5xx", [("0a1b", "02"), ("0a1b", "04")]),
        ("~outcome refused", [("3f2a", "03"), ("99aa", "03")]),
        ("~outcome '^message accepted$'", [("3f2a", "02"), ("0a1b", "02")]),
        ("~slow 0.5", [("3f2a", "03"), ("99aa", "03")]),
        ("~slow 501ms", [("3f2a", "03")]),
        ("~slow 2s", [("3f2a", "03")]),
        ("~tls", [("0a1b", "02")]),
        ("!~tls & ~from carol", [("0a1b", "04")]),
        ("~from alice ~code 5xx | ~tls", [("3f2a", "02"), ("0a1b", "02"), ("3f2a", "03")]),
        ("~from alice & (~code 4xx | ~slow 1)", [("3f2a", "03")]),
        ("!(~from alice | ~from carol)", [("99aa", "03")]),
    ],
)
def test_each_term_picks_what_it_says(expression, expected):
    assert sorted(picked(expression)) == sorted(expected)


def test_lines_without_the_new_fields_are_matched_on_what_they_have():
    old = [OLD_TRANSACTION]
    assert picked("~from ^old@", old) and picked("~code 250", old) and picked("~client 127.0.0.1", old)
    assert not picked("~to .", old) and not picked("~helo .", old) and not picked("~tls", old)
    assert not picked("~code 5xx", old)  # its refused recipient's code was never logged


@pytest.mark.parametrize(
    ("expression", "printed"),
    [
        ("~from a", "~from a"),
        ("  ~from   a  ", "~from a"),
        ("~from a ~to b", "~from a & ~to b"),
        ("~from a&~to", "~from a&~to"),  # an argument runs to the next space: this is one regex
        ("(~from (a|b))", "~from (a|b)"),
        ("~from a | ~to b & ~tls", "~from a | ~to b & ~tls"),
        ("(~from a | ~to b) & ~tls", "(~from a | ~to b) & ~tls"),
        ("~tls & (~tls & ~tls)", "~tls & (~tls & ~tls)"),
        ("!!~tls", "!!~tls"),
        ("!(~tls|~tls)", "!(~tls | ~tls)"),
        ("~from 'a b'", '~from "a b"'),
        ('~from "say \\"hi\\" \\\\ \\d"', '~from "say \\"hi\\" \\\\ \\\\d"'),
        ("~from a)b", None),
    ],
)
def test_expressions_print_back_in_one_canonical_form(expression, printed):
    if printed is None:
        with pytest.raises(FilterError):
            parse(expression)
        return
    assert str(parse(expression)) == printed
    assert parse(printed) == parse(expression)


def test_a_quoted_argument_keeps_backslashes_for_the_regular_expression():
    term = parse('~from "\\d+@"')
    assert term == Term("from", "\\d+@") and term({"sender": "123@x"}) and not term({"sender": "a@x"})


# -- error positions -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("expression", "column", "says"),
    [
        ("", 1, "empty filter"),
        ("   ", 4, "empty filter"),
        ("~", 1, "unknown term ~ "),
        ("~tls & ~bogus x", 8, "unknown term ~bogus"),
        ("~FROM a", 1, "unknown term ~"),
        ("~from", 6, "needs an argument"),
        ("~from   ", 9, "needs an argument"),
        ("~from(a)", 6, "needs an argument after a space, not '('"),
        ("~from (", 7, "bad regular expression"),
        ("~tls | ~to [z-a]", 12, "bad regular expression"),
        ("~client 10.0.0.0/33(", 9, "bad regular expression"),
        ("~session xyz", 10, "hex digits"),
        ("~code 6xx", 7, "reply code"),
        ("~code 5x0", 7, "reply code"),
        ("~code 2500", 7, "reply code"),
        ("~slow soon", 7, "a time"),
        ("~slow -1", 7, "a time"),
        ("~from 'abc", 7, "quote ' is never closed"),
        ('~from "abc\\"', 7, 'quote " is never closed'),
        ("(~tls", 1, "'(' is never closed"),
        ("~tls & ((~tls)", 8, "'(' is never closed"),
        ("~tls)", 5, "')' closes no '('"),
        ("~tls x", 6, "expected '&', '|' or the end, not 'x'"),
        ("~tls &", 7, "at the end"),
        ("~tls | | ~tls", 8, "not '|'"),
        ("!", 2, "at the end"),
        ("()", 2, "not ')'"),
        ("alice", 1, "not 'a'"),
    ],
)
def test_every_error_says_where(expression, column, says):
    with pytest.raises(FilterError) as caught:
        parse(expression)
    assert caught.value.position == column - 1
    assert str(caught.value).startswith(f"column {column}: ") and says in str(caught.value)


# -- properties ------------------------------------------------------------------------

def _valid_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


ARG_TEXT = st.text(alphabet=st.sampled_from(list("ab@.()|&!~ \"'\\x*5")) | st.characters(), max_size=8)
REGEX = ARG_TEXT.filter(_valid_regex)
ARGUMENTS = {
    "from": REGEX, "to": REGEX, "helo": REGEX, "outcome": REGEX,
    "client": REGEX.filter(lambda a: "/" not in a) | st.sampled_from(["10.0.0.0/8", "::1", "127.0.0.2"]),
    "session": st.from_regex(r"[0-9a-fA-F]{1,12}", fullmatch=True),
    "code": st.from_regex(r"[1-5](xx|[0-9]x|[0-9]{2})", fullmatch=True),
    "slow": st.from_regex(r"[0-9]{1,3}(\.[0-9]{0,2})?(ms|s)?", fullmatch=True),
}


@st.composite
def terms(draw) -> Term:
    name = draw(st.sampled_from(sorted(OPERATORS)))
    if name not in ARGUMENTS:
        return Term(name)
    return Term(name, draw(ARGUMENTS[name]))


TREES = st.recursive(
    terms(),
    lambda children: st.one_of(
        children.map(Not),
        st.tuples(children, children).map(lambda pair: And(*pair)),
        st.tuples(children, children).map(lambda pair: Or(*pair)),
    ),
    max_leaves=8,
)


@given(TREES)
def test_any_tree_printed_parses_back_to_the_same_tree(tree):
    printed = str(tree)
    assert parse(printed) == tree
    assert str(parse(printed)) == printed


@given(st.lists(st.sampled_from(list("~()!&|' \"\\") + ["~from ", "~tls", "~code 5xx", "a", "~to "]),
               max_size=30).map("".join))
def test_any_text_parses_to_a_tree_that_prints_back_or_fails_at_a_place_inside_it(text):
    try:
        tree = parse(text)
    except FilterError as error:
        position = error.position
    else:
        assert parse(str(tree)) == tree
        return
    assert 0 <= position <= len(text)


@given(ARG_TEXT)
def test_quote_makes_any_argument_read_back_whole(arg):
    assert parse(f"~helo {quote(arg)}") == Term("helo", arg) if _valid_regex(arg) else True
    # and it ends where it should: a term after it is still a term
    if _valid_regex(arg):
        assert parse(f"(~helo {quote(arg)}) ~tls") == And(Term("helo", arg), Term("tls"))


def test_the_hand_written_log_is_json_lines():
    assert inspect_log.text().count("\n") == len(LINES)
