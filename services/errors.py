"""The services' exceptions, under one root.

    ServiceError
    ├── ConfigError         a setting is missing or wrong (services.config)
    ├── LostLeadership      the scheduler's lease expired or another instance took it
    └── ApiError            a request the gateway answers with an error status (services.gateway.errors)

The message language raises its own, under :class:`events.errors.EventsError`; Redis's, and the
standard library's (OSError, ValueError for bad paths), pass through as they are.
"""

from __future__ import annotations


class ServiceError(Exception):
    """The root of the exceptions the services raise on purpose."""


class LostLeadership(ServiceError):
    """The scheduler's lease expired or another scheduler took it."""
