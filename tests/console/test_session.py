"""Signing in to the console: the form, the session cookie, its expiry and signature, the keyring asked again on
every request, CSRF on every form, no open redirect, and the headers of every response."""

from __future__ import annotations

import re
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote

import pytest

from kbms.api.console.session import SESSION_COOKIE, Signer
from tests.conftest import migrated_sqlite_url
from tests.console.support import (
    ADMIN,
    CSP,
    INGESTER,
    KEYS,
    PAGES,
    READER,
    REVOKED,
    SECRET,
    console,
    csrf_of,
    settings_for,
    sign_in,
    signed_in,
)
from tests.support import canary


@pytest.fixture
def url(tmp_path: Path) -> str:
    return migrated_sqlite_url(tmp_path)


def cookie_attributes(header: str) -> dict[str, str | bool]:
    parsed: SimpleCookie = SimpleCookie()
    parsed.load(header)
    (morsel,) = parsed.values()
    flags = {part.strip().split("=")[0].lower() for part in header.split(";")[1:]}
    return {
        "value": morsel.value,
        "path": morsel["path"],
        "max-age": str(morsel["max-age"]),
        "samesite": morsel["samesite"],
        "httponly": "httponly" in flags,
        "secure": "secure" in flags,
    }


def test_pages_need_a_session_and_come_back_after_sign_in(url: str) -> None:
    with console(settings_for(url)) as client:
        for path in (*PAGES, "/console/conversations/00000000-0000-0000-0000-000000000000", "/console/sources"):
            response = client.get(path + "?state=open")
            assert response.status_code == 303
            assert response.headers["location"] == "/console/login?next=" + quote(path + "?state=open", safe="")
        landed = sign_in(client, READER, next_="/console/conversations?state=open")
        assert (landed.status_code, landed.headers["location"]) == (303, "/console/conversations?state=open")
        assert client.get("/console/conversations?state=open").status_code == 200


def test_login_form(url: str) -> None:
    with console(settings_for(url)) as client:
        form = client.get("/console/login")
    assert form.status_code == 200
    html = form.text
    assert '<html lang="en">' in html
    assert "<title>Sign in · kbms console</title>" in html
    assert '<form class="login" method="post" action="/console/login">' in html
    assert '<label for="key">API key</label>' in html
    assert '<input type="password" id="key" name="key" autocomplete="off" required>' in html
    assert '<button type="submit">Sign in</button>' in html
    assert html.count("<h1>") == 1
    assert '<main id="main">' in html
    assert '<nav aria-label="Console">' in html


def test_session_cookie_flags(url: str) -> None:
    with console(settings_for(url, console_session_ttl=600)) as client:
        response = sign_in(client, ADMIN)
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "=")]
    attributes = cookie_attributes(header)
    assert attributes["path"] == "/console"
    assert attributes["samesite"] == "Strict"
    assert attributes["httponly"]
    assert attributes["max-age"] == "600"
    assert not attributes["secure"]
    assert ADMIN not in header
    assert ADMIN[5:] not in header
    with console(settings_for(url), base_url="https://console.test") as client:
        response = sign_in(client, ADMIN)
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "=")]
    assert cookie_attributes(header)["secure"]


@pytest.mark.parametrize(
    "key",
    [INGESTER, REVOKED, "kbms_" + "A" * 43, canary.TOKEN, ""],
    ids=["ingest-only", "revoked", "unknown", "bad", "none"],
)
def test_refused_key_is_401_and_never_echoed(url: str, key: str) -> None:
    with console(settings_for(url)) as client:
        response = sign_in(client, key)
        assert response.status_code == 401
        assert '<p role="alert" class="refused">That key was not accepted' in response.text
        if key:
            assert key not in response.text
        assert SESSION_COOKIE + "=" not in " ".join(response.headers.get_list("set-cookie"))
        assert client.get("/console").status_code == 303


def test_sign_in_form_needs_its_csrf_token(url: str) -> None:
    with console(settings_for(url)) as client:
        assert client.post("/console/login", data={"key": ADMIN}).status_code == 403
        client.get("/console/login")  # the nonce cookie, but a token of another form
        assert client.post("/console/login", data={"key": ADMIN, "csrf": "0" * 64}).status_code == 403
    with console(settings_for(url)) as other:
        token = csrf_of(other.get("/console/login"))
    with console(settings_for(url)) as client:  # a token without its cookie
        assert client.post("/console/login", data={"key": ADMIN, "csrf": token}).status_code == 403


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/console",
        "/console\\@evil.example",
        "/consolex",
        "javascript:alert(1)",
        "/internal/conversations",
    ],
)
def test_no_open_redirect(url: str, target: str) -> None:
    with console(settings_for(url)) as client:
        response = sign_in(client, ADMIN, next_=target)
    assert (response.status_code, response.headers["location"]) == (303, "/console")


def test_expired_and_tampered_sessions_are_refused(url: str) -> None:
    signer = Signer(SECRET.encode())
    _, expired = signer.new_session("admin", now=int(time.time()) - 100, ttl=50)
    _, fresh = signer.new_session("admin", now=int(time.time()), ttl=600)
    _, foreign = Signer(b"another secret").new_session("admin", now=int(time.time()), ttl=600)
    payload, mac = fresh.split(".")
    tampered = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + mac
    with console(settings_for(url)) as client:
        for value in (expired, foreign, tampered, "garbage", fresh + "x"):
            client.cookies.set(SESSION_COOKIE, value, path="/console")
            assert client.get("/console").status_code == 303, value
        client.cookies.set(SESSION_COOKIE, fresh, path="/console")
        assert client.get("/console").status_code == 200


def test_the_keyring_is_asked_on_every_request(url: str) -> None:
    with console(settings_for(url)) as client:
        signed_in(client, ADMIN)
        cookie = client.cookies.get(SESSION_COOKIE)
    assert cookie is not None
    revoked = [{**key, "revoked": key["name"] == "admin"} for key in KEYS]
    removed = [key for key in KEYS if key["name"] != "admin"]
    for keys in (revoked, removed):
        with console(settings_for(url, keys)) as client:
            client.cookies.set(SESSION_COOKIE, cookie, path="/console")
            assert client.get("/console").status_code == 303
    with console(settings_for(url)) as client:  # same secret, same keys: still signed in
        client.cookies.set(SESSION_COOKIE, cookie, path="/console")
        assert client.get("/console").status_code == 200


def test_sign_out(url: str) -> None:
    with console(settings_for(url)) as client:
        page = signed_in(client, READER).get("/console")
        assert "Signed in as <strong>reader</strong>" in page.text
        assert "Sign out</button>" in page.text
        assert client.post("/console/logout", data={}).status_code == 403
        response = client.post("/console/logout", data={"csrf": csrf_of(page)})
        assert (response.status_code, response.headers["location"]) == (303, "/console/login")
        assert client.get("/console").status_code == 303


def test_headers_on_every_console_response(url: str) -> None:
    with console(settings_for(url)) as client:
        anonymous = [client.get("/console/login"), client.get("/console"), client.post("/console/login", data={})]
        signed_in(client, ADMIN)
        pages = [client.get(path) for path in PAGES]
        pages += [client.get("/console/nope"), client.get("/console/conversations?state=bogus")]
        static = [client.get("/console/static/console.css"), client.get("/console/static/console.js")]
        for response in anonymous + pages + static:
            assert response.headers["content-security-policy"] == CSP, response.url
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "same-origin"
        for response in anonymous + pages:
            assert response.headers["cache-control"] == "no-store", response.url
    assert static[0].headers["content-type"].startswith("text/css")
    assert static[1].headers["content-type"].startswith("text/javascript")
    for response in pages:
        # No inline script or style: the policy would block them.
        assert not re.search(r"<script(?![^>]*\bsrc=\"/console/static/console\.js\")", response.text)
        assert " style=" not in response.text
        assert "<style" not in response.text


def test_without_keys_the_console_is_open_and_still_needs_csrf(url: str) -> None:
    with console(settings_for(url, keys=None)) as client:
        page = client.get("/console/rejects")
        assert page.status_code == 200
        assert "No API keys configured" in page.text
        assert "Sign out" not in page.text
        assert client.get("/console/login").headers["location"] == "/console"
        header = next(h for h in page.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
        assert cookie_attributes(header)["httponly"]
        assert client.post("/console/rejects/reprocess", data={"delivery": "1"}).status_code == 403
        token = csrf_of(client.get("/console/rejects"))  # the same session: the same token
        assert token == csrf_of(page)
        assert client.post("/console/rejects/reprocess", data={"delivery": "1", "csrf": token}).status_code == 404
