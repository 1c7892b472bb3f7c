"""`python -m streamer` is the same as the `streamer` console script."""

from streamer.cli import main

raise SystemExit(main())
