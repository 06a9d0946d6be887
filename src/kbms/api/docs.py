"""The API's documentation pages, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, with every asset served by kbms.

FastAPI's own pages load their JavaScript and CSS from a public CDN, so on a machine without internet (common for an
internal service) they are blank. The assets come from the ``fastapi-offline`` package, pinned in pyproject.toml
(it ships Swagger UI 5 and ReDoc 2 as plain files; kbms uses the files, not its app factory), and are served from
``/docs/assets/{name}``: a route with a fixed list of names, so nothing else on disk can be asked for.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from kbms.errors import NotFound

ASSETS_PATH = "/docs/assets"
# The files a page may ask for, and their media types.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# A week: the files change only with the pinned package, and a new kbms version changes the page that names them.
CACHE_CONTROL = "public, max-age=604800"


@cache
def _asset_directory() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Routes for the pages (the app must be built with ``docs_url=None, redoc_url=None``)."""
    router = APIRouter(include_in_schema=False)
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{ASSETS_PATH}/favicon.png"

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=favicon,
            oauth2_redirect_url="/docs/oauth2-redirect",
            # No badge fetched from the public validator: the page must not reach outside kbms.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @router.get("/docs/oauth2-redirect")
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )

    @router.get(ASSETS_PATH + "/{name}")
    async def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise NotFound("No such documentation asset")
        return FileResponse(_asset_directory() / name, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL})

    app.include_router(router)
