"""The delivery state machine, as data (after pynetdicom's ``fsm.py``).

``TRANSITIONS`` maps (state, event) to the next state; :func:`next_state` raises
:class:`~gateway.errors.TransitionError` for any pair it does not list.

::

    PENDING ──claim──> IN_PROGRESS ──delivered──> DELIVERED
    RETRY_WAIT ─claim─┘   │  │  │ └─delivered_with_warnings──> DELIVERED_WITH_WARNINGS
                          │  │  └──retryable_failure──> RETRY_WAIT
                          │  └──permanent_failure / attempts_exhausted──> FAILED (dead letter)
                          └──quarantine──> QUARANTINED   (de-identification failed closed)
    IN_PROGRESS ──lease_expired (claimed again)──> IN_PROGRESS
    PENDING | RETRY_WAIT | IN_PROGRESS ──cancel──> CANCELLED
    FAILED | CANCELLED | QUARANTINED | DELIVERED_WITH_WARNINGS ──retry (admin)──> PENDING
"""

from __future__ import annotations

from enum import StrEnum

from gateway.errors import TransitionError


class State(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    RETRY_WAIT = "retry_wait"
    DELIVERED = "delivered"
    DELIVERED_WITH_WARNINGS = "delivered_with_warnings"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    CANCELLED = "cancelled"


class Event(StrEnum):
    CLAIM = "claim"
    LEASE_EXPIRED = "lease_expired"
    DELIVERED = "delivered"
    DELIVERED_WITH_WARNINGS = "delivered_with_warnings"
    RETRYABLE_FAILURE = "retryable_failure"
    PERMANENT_FAILURE = "permanent_failure"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    QUARANTINE = "quarantine"
    CANCEL = "cancel"
    RETRY = "retry"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.PENDING, Event.CLAIM): State.IN_PROGRESS,
    (State.RETRY_WAIT, Event.CLAIM): State.IN_PROGRESS,
    (State.IN_PROGRESS, Event.LEASE_EXPIRED): State.IN_PROGRESS,
    (State.IN_PROGRESS, Event.DELIVERED): State.DELIVERED,
    (State.IN_PROGRESS, Event.DELIVERED_WITH_WARNINGS): State.DELIVERED_WITH_WARNINGS,
    (State.IN_PROGRESS, Event.RETRYABLE_FAILURE): State.RETRY_WAIT,
    (State.IN_PROGRESS, Event.PERMANENT_FAILURE): State.FAILED,
    (State.IN_PROGRESS, Event.ATTEMPTS_EXHAUSTED): State.FAILED,
    (State.IN_PROGRESS, Event.QUARANTINE): State.QUARANTINED,
    (State.PENDING, Event.CANCEL): State.CANCELLED,
    (State.RETRY_WAIT, Event.CANCEL): State.CANCELLED,
    (State.IN_PROGRESS, Event.CANCEL): State.CANCELLED,
    (State.FAILED, Event.RETRY): State.PENDING,
    (State.CANCELLED, Event.RETRY): State.PENDING,
    (State.QUARANTINED, Event.RETRY): State.PENDING,
    (State.DELIVERED_WITH_WARNINGS, Event.RETRY): State.PENDING,
}

CLAIMABLE = (State.PENDING, State.RETRY_WAIT)
OPEN = (State.PENDING, State.RETRY_WAIT, State.IN_PROGRESS)
TERMINAL = (
    State.DELIVERED,
    State.DELIVERED_WITH_WARNINGS,
    State.FAILED,
    State.QUARANTINED,
    State.CANCELLED,
)


def next_state(state: str, event: Event) -> State:
    try:
        return TRANSITIONS[(State(state), event)]
    except (KeyError, ValueError) as exc:
        raise TransitionError(f"no transition from {state!r} on {event.value!r}") from exc
