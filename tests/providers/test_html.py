"""HTML to readable text: the rules of DESIGN.md, and hostile markup."""

from __future__ import annotations

import pytest

from kbms.providers.html import html_to_text, looks_like_html, too_deep


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Hello</p><p>World</p>", "Hello\nWorld"),
        ("<p>a</p>\n\n<p>b</p>", "a\nb"),
        ("line<br>break<br/>twice<br />", "line\nbreak\ntwice"),
        ("<p>a</p><p><br></p><p>b</p>", "a\n\nb"),
        ("<p>Tom &amp; Jerry &lt;3 &quot;hi&quot; &#233;t&#xE9;</p>", 'Tom & Jerry <3 "hi" été'),
        ('<p>see <a href="https://example.com/x">the docs</a>.</p>', "see the docs."),
        ("<ul><li>Coffee</li><li>Tea</li></ul>", "Coffee\nTea"),
        ("<h2>Title</h2>text", "Title\ntext"),
        ("<p>  lots   of \n  space  </p>", "lots of space"),
        ("<script>alert(1)</script><style>p{}</style><p>ok</p>", "ok"),
        ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>", "a b\nc"),
        ("<p><i>This message was deleted</i></p>", "This message was deleted"),
        ("<b>bold</b> and <em>em</em>", "bold and em"),
        ("<!-- hidden --><p>shown</p>", "shown"),
        ('<img src="x.png" alt="a picture">', ""),
        ("<p></p>", ""),
        ("", ""),
    ],
)
def test_html_rules(html: str, text: str) -> None:
    assert html_to_text(html) == text


@pytest.mark.parametrize(
    ("plain", "text"),
    [("one\ntwo", "one\ntwo"), ("a  b\r\n\r\n\r\n\r\nc", "a b\n\nc"), ("1 < 2 and 3 > 2", "1 < 2 and 3 > 2")],
)
def test_plain_text_keeps_its_lines(plain: str, text: str) -> None:
    assert not looks_like_html(plain)
    assert html_to_text(plain) == text


def test_nul_is_removed() -> None:
    assert html_to_text("<p>a\x00b</p>") == "ab"
    assert html_to_text("a\x00b") == "ab"


def test_depth_is_measured_on_open_elements_only() -> None:
    assert too_deep("<div>" * 600)
    assert not too_deep("<br>" * 600 + "<img/>" * 600 + "<p>x</p>" * 600)


@pytest.mark.parametrize(
    "inner",
    [
        "<p>Hello &amp; <b>bye</b></p><br>line",
        "<ul><li>one</li><li>two</li></ul><h1>T</h1>x<br><br>y",
        "<table><tr><td>a</td><td>b</td></tr></table>",
    ],
)
def test_the_linear_fallback_reads_like_the_parser(inner: str) -> None:
    deep = "<div>" * 600 + inner + "</div>" * 600
    shallow = "<div>" * 5 + inner + "</div>" * 5
    assert too_deep(deep)
    assert not too_deep(shallow)
    assert html_to_text(deep).split() == html_to_text(shallow).split()
    assert html_to_text(deep).count("\n") == html_to_text(shallow).count("\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit", ["<div>", "<ul><li>", "<blockquote>", "<", "<a"])
def test_hostile_nesting_finishes(unit: str) -> None:
    # Without the depth guard, lexbor needs minutes for this (quadratic); the timeout turns a regression into a failure.
    assert len(html_to_text(unit * 300_000 + "end")) < 1_000_000
