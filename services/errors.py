"""The services' exceptions, under one root.

    ServiceError
    ├── ConfigError         a setting is missing or wrong (services.config)
    ├── LostLeadership      the scheduler's lease expired or another instance took it
    ├── ApiError            a request the gateway answers with an error status (services.gateway.errors)
    ├── Refused             a path or value that cannot be placed under the roots (services.paths;
    │                       a ValueError too)
    ├── PathOutsideRoots    at launch, a job's path no longer inside the roots (services.paths;
    │                       a ValueError too)
    ├── RedisNotFound       no redis-server to embed (services.embedded_redis; a RuntimeError too)
    └── Failed, Unreachable what the CLI client exits 1 or 3 with (services.client)

The message language raises its own, under :class:`events.errors.EventsError`; Redis's errors
pass through as they are (MasterChanged, in services.runtime, is one of them on purpose: it is
handled as a lost connection), and so do the standard library's (OSError).
"""

from __future__ import annotations


class ServiceError(Exception):
    """The root of the exceptions the services raise on purpose."""


class LostLeadership(ServiceError):
    """The scheduler's lease expired or another scheduler took it."""
