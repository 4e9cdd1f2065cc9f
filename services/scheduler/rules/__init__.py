"""The scheduler's business rules as pure functions: state and a message in, messages out.

One module per concept; this one names the rules the scheduler and the tests use.
"""

from services.scheduler.rules.commands import (
    cancel,
    cancel_sweep,
    create_sweep,
    delete,
    export,
    release,
    resume,
    set_half_life,
    set_priority,
    set_quotas,
    submit,
    suspend,
)
from services.scheduler.rules.limits import CommandRule, Limits
from services.scheduler.rules.nodes import (
    lose_node,
    lost_nodes,
    lost_runners,
    node_changes,
    reclaim_idle,
    runner_silent,
)
from services.scheduler.rules.passes import BACKFILL_SCAN, schedule
from services.scheduler.rules.placing import Placement, could_place, place, place_job, usable_gpus
from services.scheduler.rules.reactions import ENDS, RESCHEDULE_ON, on_event, react, release_dependents, reschedules

__all__ = [
    "BACKFILL_SCAN",
    "ENDS",
    "RESCHEDULE_ON",
    "CommandRule",
    "Limits",
    "Placement",
    "cancel",
    "cancel_sweep",
    "could_place",
    "create_sweep",
    "delete",
    "export",
    "lose_node",
    "lost_nodes",
    "lost_runners",
    "node_changes",
    "on_event",
    "place",
    "place_job",
    "react",
    "reclaim_idle",
    "release",
    "release_dependents",
    "reschedules",
    "resume",
    "runner_silent",
    "schedule",
    "set_half_life",
    "set_priority",
    "set_quotas",
    "submit",
    "suspend",
    "usable_gpus",
]
