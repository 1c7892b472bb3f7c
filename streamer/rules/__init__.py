"""Pure notification rules: who gets a push or an email for a message, and why not.

No I/O and no clock: documents and time come in as arguments. `decisions.py`
gathers the documents; this package only decides.
"""

from streamer.rules.decide import Decision, MessagePlan, decide, plan_message
from streamer.rules.highlights import highlight_text, is_highlighted
from streamer.rules.message import message_skip_reason, standing_skip_reason
from streamer.rules.reasons import Reason

__all__ = [
    "Decision",
    "MessagePlan",
    "Reason",
    "decide",
    "highlight_text",
    "is_highlighted",
    "message_skip_reason",
    "plan_message",
    "standing_skip_reason",
]
