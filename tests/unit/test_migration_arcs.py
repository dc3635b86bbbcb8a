"""Every (from, to) pair of migration states: the hops taken, or EINVAL."""

from __future__ import annotations

import errno
import itertools

import pytest

from muser import VfioUserError
from muser.device.migration import transition_path
from muser.wire.constants import MigrationFlag as F
from muser.wire.constants import MigrationState as S

NO_P2P = F.STOP_COPY | F.PRE_COPY
ALL = F.STOP_COPY | F.PRE_COPY | F.P2P
STOP_COPY_ONLY = F.STOP_COPY

# protocol.md §7.5, a device with PRE_COPY and without P2P (None: EINVAL).
WITHOUT_P2P = {
    (S.STOP, S.RUNNING): [S.RUNNING],
    (S.STOP, S.STOP_COPY): [S.STOP_COPY],
    (S.STOP, S.RESUMING): [S.RESUMING],
    (S.STOP, S.PRE_COPY): [S.RUNNING, S.PRE_COPY],
    (S.RUNNING, S.STOP): [S.STOP],
    (S.RUNNING, S.STOP_COPY): [S.STOP, S.STOP_COPY],
    (S.RUNNING, S.RESUMING): [S.STOP, S.RESUMING],
    (S.RUNNING, S.PRE_COPY): [S.PRE_COPY],
    (S.STOP_COPY, S.STOP): [S.STOP],
    (S.STOP_COPY, S.RUNNING): [S.STOP, S.RUNNING],
    (S.STOP_COPY, S.RESUMING): [S.STOP, S.RESUMING],
    (S.STOP_COPY, S.PRE_COPY): None,
    (S.RESUMING, S.STOP): [S.STOP],
    (S.RESUMING, S.RUNNING): [S.STOP, S.RUNNING],
    (S.RESUMING, S.STOP_COPY): [S.STOP, S.STOP_COPY],
    (S.RESUMING, S.PRE_COPY): [S.STOP, S.RUNNING, S.PRE_COPY],
    (S.PRE_COPY, S.STOP): [S.RUNNING, S.STOP],
    (S.PRE_COPY, S.RUNNING): [S.RUNNING],
    (S.PRE_COPY, S.STOP_COPY): [S.STOP_COPY],
    (S.PRE_COPY, S.RESUMING): [S.RUNNING, S.STOP, S.RESUMING],
}
PLAIN = [S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.PRE_COPY]

# Linux's paths for a device that supports P2P too (a selection; all are checked
# against the direct arcs below).
WITH_P2P = {
    (S.RUNNING, S.STOP): [S.RUNNING_P2P, S.STOP],
    (S.STOP, S.RUNNING): [S.RUNNING_P2P, S.RUNNING],
    (S.RUNNING, S.STOP_COPY): [S.RUNNING_P2P, S.STOP, S.STOP_COPY],
    (S.PRE_COPY, S.STOP_COPY): [S.PRE_COPY_P2P, S.STOP_COPY],
    (S.PRE_COPY, S.STOP): [S.RUNNING, S.RUNNING_P2P, S.STOP],
    (S.RESUMING, S.RUNNING): [S.STOP, S.RUNNING_P2P, S.RUNNING],
    (S.STOP, S.PRE_COPY): [S.RUNNING_P2P, S.RUNNING, S.PRE_COPY],
    (S.RUNNING_P2P, S.PRE_COPY_P2P): [S.PRE_COPY_P2P],
    (S.PRE_COPY_P2P, S.RUNNING): [S.RUNNING_P2P, S.RUNNING],
    (S.STOP_COPY, S.PRE_COPY_P2P): None,
}
DIRECT_WITH_P2P = {
    (S.RUNNING, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.RUNNING),
    (S.RUNNING_P2P, S.STOP),
    (S.STOP, S.RUNNING_P2P),
    (S.STOP, S.STOP_COPY),
    (S.STOP_COPY, S.STOP),
    (S.STOP, S.RESUMING),
    (S.RESUMING, S.STOP),
    (S.RUNNING, S.PRE_COPY),
    (S.PRE_COPY, S.RUNNING),
    (S.PRE_COPY, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.PRE_COPY_P2P),
    (S.PRE_COPY_P2P, S.STOP_COPY),
}
DIRECT_WITHOUT_P2P = {
    (S.RUNNING, S.STOP),
    (S.STOP, S.RUNNING),
    (S.STOP, S.STOP_COPY),
    (S.STOP_COPY, S.STOP),
    (S.STOP, S.RESUMING),
    (S.RESUMING, S.STOP),
    (S.RUNNING, S.PRE_COPY),
    (S.PRE_COPY, S.RUNNING),
    (S.PRE_COPY, S.STOP_COPY),
}


def einval(current: S, target: S, flags: F) -> None:
    with pytest.raises(VfioUserError) as caught:
        transition_path(current, target, flags)
    assert caught.value.errno == errno.EINVAL


@pytest.mark.parametrize(("current", "target"), list(itertools.product(PLAIN, PLAIN)))
def test_without_p2p(current: S, target: S) -> None:
    expected = [] if current == target else WITHOUT_P2P[current, target]
    if expected is None:
        einval(current, target, NO_P2P)
    else:
        assert transition_path(current, target, NO_P2P) == expected


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", [S.ERROR, S.RUNNING_P2P, S.PRE_COPY_P2P])
def test_unavailable_targets(current: S, target: S) -> None:
    einval(current, target, NO_P2P)


@pytest.mark.parametrize("target", list(S))
def test_nothing_leaves_error(target: S) -> None:
    einval(S.ERROR, target, ALL)


@pytest.mark.parametrize("current", PLAIN[:4])
def test_without_pre_copy(current: S) -> None:
    einval(current, S.PRE_COPY, STOP_COPY_ONLY)
    assert transition_path(S.RUNNING, S.STOP_COPY, STOP_COPY_ONLY) == [S.STOP, S.STOP_COPY]


@pytest.mark.parametrize(("pair", "expected"), list(WITH_P2P.items()))
def test_with_p2p(pair: tuple[S, S], expected: list[S] | None) -> None:
    if expected is None:
        einval(*pair, ALL)
    else:
        assert transition_path(*pair, ALL) == expected


@pytest.mark.parametrize(
    ("flags", "direct"), [(ALL, DIRECT_WITH_P2P), (NO_P2P, DIRECT_WITHOUT_P2P)]
)
def test_every_path_is_made_of_direct_arcs(flags: F, direct: set[tuple[S, S]]) -> None:
    states = [
        state
        for state in S
        if state != S.ERROR and (flags & F.P2P or state not in (S.RUNNING_P2P, S.PRE_COPY_P2P))
    ]
    for current, target in itertools.product(states, states):
        try:
            path = transition_path(current, target, flags)
        except VfioUserError:
            assert current == S.STOP_COPY
            assert target in (S.PRE_COPY, S.PRE_COPY_P2P)
            continue
        hops = list(zip([current, *path], path, strict=False))
        assert all(hop in direct for hop in hops), (current, target, path)
        assert (path[-1] if path else current) == target
