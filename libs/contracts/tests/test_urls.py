"""The rules every image and webhook URL meets before it is stored (contracts.urls)."""

from __future__ import annotations

import pytest

from imgpipe.contracts.urls import url_problem


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://a.example.com/1.jpg\u200b", "invisible character (U+200B)"),
        ("https://a.example.com/\u200e1.jpg", "invisible character (U+200E)"),
        ("https://a.example.com/\u202e1.jpg", "invisible character (U+202E)"),
        ("https://a.example\u2060.com/1.jpg", "invisible character (U+2060)"),
        ("\ufeffhttps://a.example.com/1.jpg", "invisible character (U+FEFF)"),
        ("https://a.example.com/1\xad.jpg", "invisible character (U+00AD)"),
        ("https://a.example.com:0/1.jpg", "port 0"),
        ("https://a.example.com/1.jpghttps://a.example.com/2.jpg", "two URLs run together"),
        ("https://a.example.com/1.jpgHTTP://a.example.com/2.jpg", "two URLs run together"),
        ("https://a.example.com/\ud800.jpg", "not a valid URL"),
    ],
)
def test_url_problem_refuses(url: str, reason: str) -> None:
    assert reason in (url_problem(url) or "")


@pytest.mark.parametrize(
    "url",
    [
        "https://a.example.com/fetch?url=https://b.example.com/1.jpg",
        "https://a.example.com/fetch?url=https%3A%2F%2Fb.example.com%2F1.jpg",
        "https://web.archive.org/web/2020/https://a.example.com/1.jpg",
    ],
    ids=["query-value", "percent-encoded", "archived"],
)
def test_url_problem_accepts_a_url_inside_a_url(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://a.example.com/1.jpg", "must start with http:// or https://"),
        ("https://user:secret@a.example.com/1.jpg", "must not contain credentials"),
        ("https://a.example.com/a b.jpg", "spaces or control characters"),
        ("http://127.0.0.1/1.jpg", "URL refused"),
        ("http://169.254.169.254/latest/meta-data", "URL refused"),
    ],
)
def test_url_problem_refuses_what_the_outbound_guard_would(url: str, reason: str) -> None:
    assert reason in (url_problem(url) or "")
    assert "secret" not in (url_problem(url) or "")


def test_private_addresses_pass_when_allowed() -> None:
    assert url_problem("http://127.0.0.1:8080/1.jpg", allow_private=True) is None
