"""The message language's exceptions, under one root.

    EventsError
    ├── DecodeError         an entry that is not a message this release understands (events.codec)
    ├── IllegalTransition   an event that does not apply to the state it arrives in (State.apply)
    └── BusError            the event bus refused a write (events.bus)
        ├── Fenced          a scheduler that is no longer the leader tried to commit
        └── NotReplicated   appended, but fewer replicas confirmed it than asked (also a RedisError)

DecodeError and IllegalTransition are ValueErrors too: a bad value, read or applied. Redis's own
errors pass through as they are.
"""

from __future__ import annotations


class EventsError(Exception):
    """The root of the exceptions the message language raises on purpose."""


class IllegalTransition(EventsError, ValueError):
    """An event that does not apply to the state it arrives in."""
