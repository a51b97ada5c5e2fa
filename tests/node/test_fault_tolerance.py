"""The warning a node gives when its round membership cannot survive one faulty or crashed
member (issue 17, item 14): n < 3f + 1 for f = 1, i.e. fewer than four members."""

from __future__ import annotations

import pytest

from swarmlm.node.fault_tolerance import fault_tolerance_warning, faults_tolerated


@pytest.mark.parametrize(
    ("n", "f"), [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1), (7, 2), (10, 3)]
)
def test_faults_tolerated_is_the_protocols_f(n: int, f: int) -> None:
    assert faults_tolerated(n) == f


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fewer_than_four_members_are_warned_about_naming_n_and_the_fix(n: int) -> None:
    warning = fault_tolerance_warning(n)
    member = "member tolerates" if n == 1 else "members tolerate"
    assert warning == (f"n = {n} {member} no faulty or crashed member (need n >= 4 for f = 1)")


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_four_or_more_members_tolerate_one_fault_and_get_no_warning(n: int) -> None:
    assert fault_tolerance_warning(n) is None


def test_no_membership_yet_gives_no_warning() -> None:
    assert fault_tolerance_warning(0) is None


def test_a_higher_target_names_what_it_needs() -> None:
    assert fault_tolerance_warning(5, want_f=2) == (
        "n = 5 members tolerate 1 faulty or crashed member (need n >= 7 for f = 2)"
    )
    assert fault_tolerance_warning(7, want_f=2) is None


def test_a_target_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="want_f"):
        fault_tolerance_warning(3, want_f=0)
