"""The stub server itself answers from its script and records what it got."""

from __future__ import annotations

import httpx

from tests.servers import Reply, StubApp, serve_http


def test_stub_records_and_follows_its_script() -> None:
    app = StubApp()
    app.script("/push/gcm/send", Reply(status=500), Reply(status=406, body={"error": "dead"}))
    with serve_http(app) as url, httpx.Client(base_url=url) as client:
        statuses = [client.post("/push/gcm/send", json={"n": i}).status_code for i in range(3)]
    assert statuses == [500, 406, 200]
    assert [r.json() for r in app.received("/push/gcm/send")] == [{"n": 0}, {"n": 1}, {"n": 2}]
