"""streamer: a sidecar that gives Rocket.Chat fast, correct, reliable push and email."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamer")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
