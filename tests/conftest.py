"""Shared fixtures: one real `mongod` replica set per session, a fresh database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from streamer import devmongo
from tests.servers import StubApp, serve_http

Doc = dict[str, object]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """$STREAMER_TEST_MONGO_URI if set, else a replica set started from the wheel."""
    external = os.environ.get("STREAMER_TEST_MONGO_URI")
    if external:
        yield external
        return
    # Test commands allow MongoDB's own fail points (`failCommand`) in the tests.
    with devmongo.running(extra_args=("--setParameter", "enableTestCommands=1")) as server:
        yield server.uri


@pytest.fixture
def db_name(mongo_uri: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with MongoClient(mongo_uri) as client:
        client.drop_database(name)


@pytest.fixture
async def mongo(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def db(mongo: AsyncMongoClient[Doc], db_name: str) -> AsyncDatabase[Doc]:
    return mongo[db_name]


@pytest.fixture
def sync_db(mongo_uri: str, db_name: str) -> Iterator[Database[Doc]]:
    with MongoClient(mongo_uri) as client:
        yield client[db_name]


@pytest.fixture
def stub() -> StubApp:
    """A recording stand-in gateway; script its replies per test."""
    return StubApp()


@pytest.fixture
def gateway_url(stub: StubApp) -> Iterator[str]:
    with serve_http(stub) as url:
        yield url
