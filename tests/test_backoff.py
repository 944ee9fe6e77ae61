"""with_backoff: transient errors are retried with doubling, capped delays; others pass; then it gives up."""

import pytest

import bench.backoff as backoff


class Down(ConnectionError):
    pass


class GaveUp(RuntimeError):
    pass


def is_down(error: BaseException) -> bool:
    return isinstance(error, Down)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """A fake clock that only sleeping advances; the sleeps taken, in order."""
    clock, taken = [0.0], []

    def sleep(seconds: float) -> None:
        taken.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(backoff.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(backoff.time, "sleep", sleep)
    return taken


def test_retries_transient_errors_with_doubling_capped_delays(sleeps):
    answers = iter([Down(), Down(), Down(), Down(), "ok"])

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    result = backoff.with_backoff(
        call, transient=is_down, seconds=60, first_delay=0.5, max_delay=1.5, give_up=GaveUp
    )
    assert result == "ok" and sleeps == [0.5, 1.0, 1.5, 1.5]


def test_gives_up_at_the_deadline_from_the_last_error(sleeps):
    errors = []

    def call():
        errors.append(Down(f"try {len(errors)}"))
        raise errors[-1]

    with pytest.raises(GaveUp) as gave_up:
        backoff.with_backoff(
            call,
            transient=is_down,
            seconds=5,
            first_delay=1,
            max_delay=30,
            give_up=lambda e: GaveUp(f"gave up after {e}"),
        )
    assert sleeps == [1, 2]  # at t = 3 the next wait (4 s) would pass the 5 s deadline
    assert str(gave_up.value) == "gave up after try 2" and gave_up.value.__cause__ is errors[-1]


def test_other_errors_pass_at_once(sleeps):
    def call():
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        backoff.with_backoff(call, transient=is_down, seconds=60, first_delay=1, max_delay=2, give_up=GaveUp)
    assert sleeps == []
