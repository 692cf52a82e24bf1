"""The prompt-weight parser of --weighted_captions, alone: spans and weights worked out by hand from the
AUTOMATIC1111 syntax sd-scripts reads (1.1 per round bracket, 1/1.1 per square bracket, explicit ``:w``)."""

from __future__ import annotations

import pytest

from library.prompt_weights import parse_prompt_weights, separator_inside_brackets

DOWN = 1 / 1.1


def assert_spans(text: str, expected: list[tuple[str, float]]) -> None:
    spans = parse_prompt_weights(text)
    assert [piece for piece, _ in spans] == [piece for piece, _ in expected]
    assert [weight for _, weight in spans] == pytest.approx([weight for _, weight in expected], rel=1e-12)


@pytest.mark.parametrize("text, spans", [
    ("a red square", [("a red square", 1.0)]),
    ("", [("", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("a (red:1.5) square", [("a ", 1.0), ("red", 1.5), (" square", 1.0)]),
    ("a (red:-0.5) square", [("a ", 1.0), ("red", -0.5), (" square", 1.0)]),
    ("[blurry] photo", [("blurry", DOWN), (" photo", 1.0)]),
    ("((cat)) dog", [("cat", 1.1 * 1.1), (" dog", 1.0)]),
    ("((dog:1.3))", [("dog", 1.3 * 1.1)]),
    ("[[a]] b", [("a", DOWN * DOWN), (" b", 1.0)]),
    ("([cat]) y", [("cat y", 1.0)]),  # 1/1.1 * 1.1 is exactly 1.0, so the spans join
    ("([cat]:2) y", [("cat", DOWN * 2), (" y", 1.0)]),
    # an unclosed bracket closes at the end; a closing bracket with nothing open is text
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[half open", [("half open", DOWN)]),
    ("a) b] c", [("a) b] c", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    # neighbours of one weight are joined, even across brackets
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    # a weight only closes a round bracket; in square brackets it stays text
    ("[a:1.2]", [("a:1.2", DOWN)]),
    ("time: 5", [("time: 5", 1.0)]),
])
def test_spans_and_weights(text, spans):
    assert_spans(text, spans)


def test_nested_weights_multiply_in_closing_order_like_sd_scripts():
    """AUTOMATIC1111's own example: inner brackets scale first, the unclosed outer '(' at the end."""
    spans = parse_prompt_weights("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [text for text, _ in spans] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    # the exact floats of multiplying 1.0 by each factor in that order
    assert [weight for _, weight in spans] == [
        1.0, 1.0 * 1.3 * 1.1 * 1.1, 1.0 * 1.1, 1.0 * DOWN * 1.1, 1.0 * 1.1, 1.0 * 0.5 * 1.1, 1.0 * 1.1,
        1.0 * 1.1 * 1.1 * 1.1 * 1.1, 1.0 * 1.1,
    ]


@pytest.mark.parametrize("text, spans", [
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"\[x\] (y\)z)", [("[x] ", 1.0), ("y)z", 1.1)]),
    (r"back\\slash", [("back\\slash", 1.0)]),
    (r"lone\backslash", [("lonebackslash", 1.0)]),  # a backslash before anything else is dropped
    (r"(a\:1.2)", [("a", 1.2)]),  # the lone backslash is dropped, ':1.2)' still closes the bracket
])
def test_escapes(text, spans):
    assert_spans(text, spans)


def test_a_malformed_weight_names_the_caption():
    with pytest.raises(ValueError, match=r"'\(red:1\.2\.3\) cat': '1\.2\.3' is not a number"):
        parse_prompt_weights("(red:1.2.3) cat")


@pytest.mark.parametrize("text, inside", [
    ("(red, blue:1.2), cat", True),
    ("[red, blue], cat", True),
    ("((red), blue), cat", True),
    ("(red:1.2), (blue:1.2), cat", False),
    (r"\(red, blue\), cat", False),
    ("red), (blue", False),  # the ')' closes nothing, the '(' opens after the comma
    ("a, b, c", False),
])
def test_separator_inside_brackets(text, inside):
    assert separator_inside_brackets(text, ",") is inside


def test_separator_inside_brackets_uses_the_subsets_separator():
    assert separator_inside_brackets("(red; blue), cat", ";")
    assert not separator_inside_brackets("(red; blue), cat", "|")
