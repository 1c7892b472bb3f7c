"""The harness itself: the real replica set supports change streams."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from pymongo.asynchronous.database import AsyncDatabase

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.anyio
async def test_change_stream_sees_an_insert(db: AsyncDatabase[dict[str, object]]) -> None:
    collection = db["probe"]
    async with await collection.watch([{"$match": {"operationType": "insert"}}]) as stream:
        await collection.insert_one({"_id": "x", "value": 1})
        change = await stream.next()
    assert change["operationType"] == "insert"
    assert change["fullDocument"] == {"_id": "x", "value": 1}


def test_run_dev_mongo_without_the_wheel_says_how_to_get_it(tmp_path: Path) -> None:
    """Exit 2 with the fix, not a traceback, and no empty data directory left behind."""
    stub = tmp_path / "path" / "fiftyone"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")  # a package without `db`: the wheel is missing
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "STREAMER_MONGO__URI"}
    env |= {"PYTHONPATH": str(stub.parent), "TMPDIR": str(temp)}
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--dev-mongo"],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO,
    )  # fmt: skip
    (line,) = [orjson.loads(text) for text in result.stdout.splitlines()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert line["event"] == "dev_mongo_unavailable" and "pip install" in line["error"]
    assert list(temp.iterdir()) == []
