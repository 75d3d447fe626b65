"""The pieces of multiserve.admission that need no server: byte counts from headers, the
timeout a client asks for, and the budget of bytes being received."""

from __future__ import annotations

import asyncio

import pytest

from multiserve.admission import Admission, BodyBudget, Overloaded
from multiserve.errors import MalformedRequest
from multiserve.http.body import declared_length


@pytest.mark.parametrize(
    ("value", "expected"), [(b"0", 0), (b"123", 123), (" 42 ", 42), (b"", None), ("", None)]
)
def test_byte_counts(value: bytes | str, expected: int | None) -> None:
    assert declared_length(value) == expected


def test_a_byte_count_of_5000_digits_is_over_any_limit_without_parsing_it() -> None:
    assert declared_length(b"9" * 5000) > 2**63  # type: ignore[operator]


@pytest.mark.parametrize("value", ["\xb2", "١٢", "12a", "-1", "+1", "1.0", "0x10", "1_000"])
def test_anything_but_ascii_digits_is_400(value: str) -> None:
    with pytest.raises(MalformedRequest):
        declared_length(value)
    with pytest.raises(MalformedRequest):
        declared_length(value.encode("utf-8"))


def test_the_header_can_only_shorten_the_servers_timeout() -> None:
    async def deadlines() -> list[float | None]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        found: list[float | None] = []
        for timeout, header in [(0.0, None), (0.0, b"2"), (5.0, None), (5.0, b"2"), (1.0, b"9")]:
            deadline = Admission(request_timeout_s=timeout).deadline(header)
            found.append(None if deadline is None else round(deadline - now))
        return found

    assert asyncio.run(deadlines()) == [None, 2, 5, 2, 1]


@pytest.mark.parametrize("header", [b"soon", b"\xb2", b"-1", b"0", b"nan", b"1e-9", "٣"])
def test_a_timeout_header_that_is_no_positive_number_is_400(header: bytes | str) -> None:
    async def deadline() -> float | None:
        return Admission().deadline(header)

    with pytest.raises(MalformedRequest):
        asyncio.run(deadline())


def test_the_body_budget_refuses_past_its_limit_and_releases() -> None:
    refused: list[int] = []
    budget = BodyBudget(100, lambda: refused.append(1))
    first, second = budget.reserve(), budget.reserve()
    first.add(60)
    with pytest.raises(Overloaded):
        second.add(41)
    second.add(40)
    assert budget.held == 100
    first.release()
    second.add(50)
    second.release()
    assert budget.held == 0
    assert refused == [1]
