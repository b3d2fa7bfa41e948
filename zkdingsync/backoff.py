"""The one back-off policy: exponential, capped, with "equal jitter", on tenacity's wait strategies.

The poller (a terminal that keeps failing) and the forwarder (DingTalk down or throttling) both wait
`Backoff.seconds(failures)`: `initial * 2 ** (failures - 1)` capped at `maximum`, then a random share
between half and all of it, so that terminals behind one broken switch, or daemons behind one uplink, do
not retry in lockstep. Any number of failures is fine: tenacity stops the exponent at the cap before
it could overflow (a weekend without DingTalk is thousands of failed probes).
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_base, wait_exponential

_MAX_ATTEMPT = 1000


class wait_equal_jitter(wait_base):
    """Between half and all of another strategy's wait; `jitter()` returns a float in [0, 1)."""

    def __init__(self, wait: wait_base, jitter: Callable[[], float]) -> None:
        self._wait = wait
        self._jitter = jitter

    def __call__(self, retry_state: RetryCallState) -> float:
        full = self._wait(retry_state)
        return full / 2 + full / 2 * self._jitter()


class Backoff:
    """The wait after a run of consecutive failures (see the module docstring)."""

    def __init__(
        self, initial_seconds: float, maximum_seconds: float, *, jitter: Callable[[], float]
    ) -> None:
        """Given the first wait, the cap and a source of floats in [0, 1) (tests pin it), build the policy."""
        self.initial_seconds = initial_seconds
        self.maximum_seconds = maximum_seconds
        self._wait = wait_equal_jitter(
            wait_exponential(multiplier=initial_seconds, max=maximum_seconds), jitter
        )
        self._retrying = Retrying()

    def seconds(self, failures: int) -> float:
        """Given how many consecutive failures there were (0 or 1: the first), return the wait in seconds."""
        state = RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        # Past a thousand failures every wait is the cap: older tenacity would still compute 2 ** n first.
        state.attempt_number = min(max(1, failures), _MAX_ATTEMPT)
        return min(self.maximum_seconds, self._wait(state))
