"""The vfio-user session, without any I/O: what a connection *is* (negotiation, the
order of commands, message ids, the requests each end awaits, deadlines, closing),
as state machines that take bytes in and give messages and requests out.

`ServerSession` serves one client for one device; `ClientSession` is the other end.
Whoever drives them (muser's asyncio adapters, or a test in memory) gives them a
sink for messages, an events object for what needs a loop, and a clock.
"""

from muser.session.base import MSG_ID_MODULUS, Payload, Session
from muser.session.client import ClientSession
from muser.session.negotiation import MAX_MSG_FDS
from muser.session.outcome import (
    HandlerCall,
    Observer,
    Outcome,
    Packed,
    Reply,
    ServerEvents,
    SessionEvents,
    Sink,
)
from muser.session.server import ServerSession, SessionSettings
from muser.session.state import TRANSITIONS, Lifecycle, LifecycleError

__all__ = [
    "MAX_MSG_FDS",
    "MSG_ID_MODULUS",
    "TRANSITIONS",
    "ClientSession",
    "HandlerCall",
    "Lifecycle",
    "LifecycleError",
    "Observer",
    "Outcome",
    "Packed",
    "Payload",
    "Reply",
    "ServerEvents",
    "ServerSession",
    "Session",
    "SessionEvents",
    "SessionSettings",
    "Sink",
]
