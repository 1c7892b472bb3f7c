"""Every Prometheus metric the daemon exports, defined once.

Labels are bounded: reason codes, status classes and stream names, never ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# No `*_created` series beside every counter and histogram: they double what is
# scraped and say only when the process started, which process metrics already say.
disable_created_metrics()  # type: ignore[no-untyped-call]

MESSAGES_SEEN = Counter("streamer_messages_seen", "Message inserts read from the change stream")
DECISIONS = Counter(
    "streamer_decisions", "Per-recipient decisions, by channel and reason", ["channel", "reason"]
)
MALFORMED_DOCUMENTS = Counter(
    "streamer_malformed_documents", "Documents skipped as malformed", ["collection"]
)
QUEUE_DEPTH = Gauge("streamer_queue_depth", "Entries in the notification queue")
QUEUE_OLDEST_DUE_AGE = Gauge(
    "streamer_queue_oldest_due_age_seconds", "Now minus the due time of the earliest entry"
)
QUEUE_DROPPED = Counter(
    "streamer_queue_dropped", "Queued entries dropped before sending, by reason", ["reason"]
)
QUEUE_CLEARED = Counter("streamer_queue_cleared", "Queued entries removed because the user read")
PUSHES = Counter(
    "streamer_pushes", "Push attempts by provider and result class", ["provider", "result"]
)
PUSH_RETRIES = Counter("streamer_push_retries", "Pushes scheduled for another attempt")
PUSH_GIVEN_UP = Counter("streamer_push_given_up", "Pushes abandoned after give_up_after")
EMAIL_RETRIES = Counter("streamer_email_retries", "Emails scheduled for another attempt")
EMAIL_GIVEN_UP = Counter("streamer_email_given_up", "Emails abandoned after give_up_after")
PUSH_LATENCY = Histogram("streamer_push_request_seconds", "Provider request duration", ["provider"])
PUSHES_IN_FLIGHT = Gauge("streamer_pushes_in_flight", "Provider requests in flight")
TOKENS_DELETED = Counter("streamer_tokens_deleted", "Dead device tokens deleted")
EMAILS = Counter("streamer_emails", "Email attempts by result", ["result"])
STREAM_LAG = Gauge(
    "streamer_change_stream_lag_seconds", "Now minus clusterTime of the last event", ["stream"]
)
RESUME_TOKEN_AGE = Gauge(
    "streamer_resume_token_age_seconds", "Seconds since the resume token was saved", ["stream"]
)
HISTORY_LOST = Counter(
    "streamer_change_stream_history_lost",
    "Resume tokens that fell off the oplog (events in between were skipped)",
    ["stream"],
)
HOST_CLOCK_SKEW = Gauge(
    "streamer_host_clock_skew_seconds", "This host's clock minus MongoDB's, which the queue uses"
)
RECONNECTS = Counter("streamer_mongo_reconnects", "Change-stream reconnect attempts", ["stream"])
