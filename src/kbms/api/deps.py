"""FastAPI dependencies, as ``Annotated`` aliases. Built in ``create_app``; nothing is global."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from kbms.settings import Settings
from kbms.storage import Store


# async, though they await nothing: FastAPI runs a plain ``def`` dependency in its thread pool, a hop that cost
# more than the whole detail read (measured with py-spy).
async def get_store(request: Request) -> Store:
    return cast(Store, request.app.state.store)


async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
