"""gateway.index.states: the delivery state machine, as data."""

from __future__ import annotations

import itertools

import pytest

from gateway.errors import TransitionError
from gateway.index.states import CLAIMABLE, OPEN, TERMINAL, TRANSITIONS, Event, State, next_state


@pytest.mark.parametrize(
    ("state", "event", "target"),
    [(s, e, t) for (s, e), t in TRANSITIONS.items()],
    ids=[f"{s.value}-{e.value}" for (s, e) in TRANSITIONS],
)
def test_listed_transition(state: State, event: Event, target: State) -> None:
    assert next_state(state, event) is target
    assert next_state(state.value, event) is target  # the column holds the string


def test_expected_transitions_are_listed() -> None:
    assert TRANSITIONS[(State.PENDING, Event.CLAIM)] is State.IN_PROGRESS
    assert TRANSITIONS[(State.RETRY_WAIT, Event.CLAIM)] is State.IN_PROGRESS
    assert TRANSITIONS[(State.IN_PROGRESS, Event.RETRYABLE_FAILURE)] is State.RETRY_WAIT
    assert TRANSITIONS[(State.IN_PROGRESS, Event.ATTEMPTS_EXHAUSTED)] is State.FAILED
    assert TRANSITIONS[(State.FAILED, Event.RETRY)] is State.PENDING


def test_every_unlisted_pair_raises() -> None:
    unlisted = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in TRANSITIONS]
    assert len(unlisted) == len(State) * len(Event) - len(TRANSITIONS)
    assert unlisted
    for state, event in unlisted:
        with pytest.raises(TransitionError) as info:
            next_state(state.value, event)
        assert state.value in str(info.value)
        assert event.value in str(info.value)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.DELIVERED, Event.RETRY),
        (State.DELIVERED, Event.CANCEL),
        (State.PENDING, Event.DELIVERED),
        (State.FAILED, Event.CLAIM),
        (State.CANCELLED, Event.CANCEL),
        (State.RETRY_WAIT, Event.LEASE_EXPIRED),
    ],
)
def test_sample_of_unlisted_pairs_raise(state: State, event: Event) -> None:
    with pytest.raises(TransitionError):
        next_state(state, event)


def test_unknown_state_string_raises_transition_error() -> None:
    with pytest.raises(TransitionError):
        next_state("bogus", Event.CLAIM)


def test_terminal_states_have_no_way_out_but_retry() -> None:
    for state in TERMINAL:
        for event in Event:
            if (state, event) in TRANSITIONS:
                assert event is Event.RETRY
                assert TRANSITIONS[(state, event)] is State.PENDING
    assert not any((State.DELIVERED, e) in TRANSITIONS for e in Event)


def test_state_groups() -> None:
    assert set(CLAIMABLE) <= set(OPEN)
    assert not set(OPEN) & set(TERMINAL)
    assert set(OPEN) | set(TERMINAL) == set(State)
    for state in CLAIMABLE:
        assert (state, Event.CLAIM) in TRANSITIONS
    for state in OPEN:
        assert (state, Event.CANCEL) in TRANSITIONS
