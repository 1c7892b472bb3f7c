"""Run `streamer run` as a real subprocess and read its JSON log lines.

End-to-end and chaos tests drive the daemon exactly as an operator does: a
config file plus environment, SIGTERM to stop, SIGKILL to crash. Log lines are
collected by a reader thread so tests can wait on an event with a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

LogLine = dict[str, Any]


class Daemon:
    def __init__(
        self,
        config_path: Path,
        env: Mapping[str, str] | None = None,
        python_args: Sequence[str] = (),
    ) -> None:
        """`python_args` go before `-m streamer`, e.g. `-m cProfile -o FILE` (bench.e2e)."""
        self.config_path = config_path
        self.python_args = tuple(python_args)
        self.env = {**os.environ, **(env or {})}
        self.lines: list[LogLine] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.process = subprocess.Popen(
            [
                sys.executable,
                *self.python_args,
                "-m",
                "streamer",
                "run",
                "--config",
                str(self.config_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        return self

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            text = raw.decode(errors="replace").rstrip("\n")
            try:
                line = orjson.loads(text)
            except orjson.JSONDecodeError:
                line = {"event": "<unparsed>", "text": text}
            with self._lock:
                self.raw.append(text)
                self.lines.append(line if isinstance(line, dict) else {"event": str(line)})

    def logs(self, event: str | None = None, **fields: Any) -> list[LogLine]:
        with self._lock:
            return [
                line
                for line in self.lines
                if (event is None or line.get("event") == event)
                and all(line.get(k) == v for k, v in fields.items())
            ]

    def wait_for_log(
        self, event: str, count: int = 1, timeout: float = 30.0, **fields: Any
    ) -> list[LogLine]:
        return wait_until(
            lambda: found if len(found := self.logs(event, **fields)) >= count else None,
            timeout,
            lambda: f"log {event} {fields} x{count}; last lines: {self.raw[-15:]}",
        )

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def wait_until(
    probe: Callable[[], Any], timeout: float, describe: Callable[[], str] = lambda: "condition"
) -> Any:
    """Poll `probe` until it returns something truthy; fail with a description after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {describe()}")
        time.sleep(0.02)
