from __future__ import annotations

import pytest

from streamer.delivery.errors import retry_after_seconds

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("Tue, 14 Nov 2023 22:15:00 GMT", 100.0),
        ("Tue, 14 Nov 2023 22:00:00 GMT", 0.0),
        ("soon", None),
        ("-3", None),
        ("²", None),  # a digit to str.isdigit, not to float()
        ("1e400", None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(
    header: str | None, expected: float | None
) -> None:
    assert retry_after_seconds(header, NOW) == expected
