"""Health record and the operator's HTTP endpoint: /metrics, /livez, /readyz.

`Health` is the one place the stages report whether they can do their job;
`serve_http` exposes it (and every metric of `streamer.metrics`) to Prometheus
and to orchestrators. Liveness only says the process answers; readiness says
notifications can flow, and when they cannot, the report says which component
is at fault and why, so an operator reads the reason instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import prometheus_client
from aiohttp import web
from anyio.abc import TaskStatus

import streamer.metrics  # noqa: F401  (registers every metric with the default registry)
from streamer.config import ConfigError

#: The components that must all be ready before the daemon is: MongoDB reachable,
#: the change streams open, delivery not in a permanent-error state.
REQUIRED_COMPONENTS: tuple[str, ...] = ("mongo", "streams", "delivery")
NOT_STARTED = "not started yet"


@dataclass(frozen=True, slots=True)
class ComponentState:
    ready: bool
    #: Why the component is not ready; None when it is.
    reason: str | None


class Health:
    """Readiness by component; the daemon is ready when every component is.

    Components start not ready ("not started yet"). A component name not in
    `required` may still be reported, and then counts toward readiness too.
    """

    def __init__(self, required: Sequence[str] = REQUIRED_COMPONENTS) -> None:
        self._states: dict[str, ComponentState] = {
            name: ComponentState(ready=False, reason=NOT_STARTED) for name in required
        }

    def set_ready(self, component: str) -> None:
        self._states[component] = ComponentState(ready=True, reason=None)

    def set_failed(self, component: str, why: str) -> None:
        self._states[component] = ComponentState(ready=False, reason=why)

    @property
    def ready(self) -> bool:
        return all(state.ready for state in self._states.values())

    def report(self) -> dict[str, Any]:
        """`{"ready": bool, "components": {name: {"ready": bool, "reason": str|None}}}`."""
        return {
            "ready": self.ready,
            "components": {
                name: {"ready": state.ready, "reason": state.reason}
                for name, state in sorted(self._states.items())
            },
        }


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9464`) → (host, port); anything else is a ConfigError."""
    host, sep, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    digits = port_text.isascii() and port_text.isdecimal()
    if not sep or not host or not digits or int(port_text) > 65535:
        raise ConfigError(
            f"[http] listen = {listen!r}: expected host:port, e.g. 127.0.0.1:9464 "
            "(port 0 picks a free port)"
        )
    return host, int(port_text)


async def serve_http(
    health: Health,
    listen: str,
    *,
    shutdown: anyio.Event,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /livez and /readyz on `listen` until `shutdown` is set.

    Reports the bound address (`host:port`, the real port when 0 was asked)
    through `task_status`, so `await task_group.start(...)` returns once the
    endpoint accepts connections.
    """
    host, port = parse_listen(listen)
    runner = web.AppRunner(_application(health), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"[http] listen = {listen!r}: cannot listen: {exc}") from None
        task_status.started(_bound_address(runner, host))
        await shutdown.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


def _bound_address(runner: web.AppRunner, host: str) -> str:
    bound_port = runner.addresses[0][1]
    return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"


def _application(health: Health) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    async def livez(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        report = health.report()
        return web.Response(
            body=orjson.dumps(report),
            status=200 if report["ready"] else 503,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    return app
