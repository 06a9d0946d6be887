"""The documentation pages work without internet: every asset they reference is served by kbms itself."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from selectolax.lexbor import LexborHTMLParser

from kbms.api import create_app
from kbms.auth import key_config, new_key
from kbms.settings import Settings

PAGES = ("/docs", "/redoc")
# What a page's own inline script loads: Swagger UI's `url: '/openapi.json'`, ReDoc's `spec-url`.
SCRIPT_URL = re.compile(r"""\burl:\s*['"]([^'"]+)['"]""")


@pytest.fixture
def keyed_client(sqlite_url: str) -> Iterator[TestClient]:
    """With API keys configured: the documentation stays open, as /openapi.json is."""
    entry = key_config(new_key(), name="someone", scopes=["read"], workspaces=None)
    settings = Settings(database_url=sqlite_url, api_keys=f"[{entry}]")
    with TestClient(create_app(settings)) as client:
        yield client


def references(html: str) -> list[str]:
    tree = LexborHTMLParser(html)
    found = [node.attributes.get("src") for node in tree.css("script[src]")]
    found += [node.attributes.get("href") for node in tree.css("link[href]")]
    found += [node.attributes.get("spec-url") for node in tree.css("redoc[spec-url]")]
    for script in tree.css("script:not([src])"):
        found += SCRIPT_URL.findall(script.text())
    return [url for url in found if url]


@pytest.mark.parametrize("page", PAGES)
def test_every_asset_of_a_page_comes_from_kbms(keyed_client: TestClient, page: str) -> None:
    answer = keyed_client.get(page)
    assert answer.status_code == 200
    urls = references(answer.text)
    # Scripts, a stylesheet (Swagger UI), the favicon and the OpenAPI document at the least.
    assert len(urls) >= (4 if page == "/docs" else 3), urls
    assert "/openapi.json" in urls
    assert "http://" not in answer.text
    assert "https://" not in answer.text  # no CDN, no web fonts, no remote favicon
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme, f"{page} loads {url} from elsewhere"
        assert not parts.netloc, f"{page} loads {url} from elsewhere"
        asset = keyed_client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url


def test_the_assets_are_the_real_viewers(keyed_client: TestClient) -> None:
    bundle = keyed_client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in bundle.content
    # Swagger UI 5 is the first to read OpenAPI 3.1, which FastAPI writes.
    assert re.search(rb'"5\.\d+\.\d+"', bundle.content)
    assert keyed_client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert b"redoc" in keyed_client.get("/docs/assets/redoc.standalone.js").content.lower()
    assert keyed_client.get("/docs/assets/favicon.png").content.startswith(b"\x89PNG")


@pytest.mark.parametrize("name", ["index.html", "..%2F__init__.py", "core.py", "%2e%2e%2fcore.py", "swagger-ui.js"])
def test_nothing_but_the_listed_assets_is_served(keyed_client: TestClient, name: str) -> None:
    answer = keyed_client.get(f"/docs/assets/{name}")
    assert answer.status_code == 404
    assert answer.json()["error_code"] == "not_found"


def test_the_oauth2_redirect_page_is_served(keyed_client: TestClient) -> None:
    answer = keyed_client.get("/docs/oauth2-redirect")
    assert answer.status_code == 200
    assert "https://" not in answer.text
