"""Login throttling against password guessing, per email and per client address.

After ``FREE_FAILURES`` failed logins for one email within ``WINDOW_SECONDS`` the next attempt
must wait 1 s, then 2 s, 4 s … up to ``MAX_DELAY_SECONDS``; an address that fails
``ADDRESS_FAILURES`` times in the window is refused outright until the window passes. A
success clears the email's record. Counts are per instance (in memory): an attacker spread
over N instances gets at most N times the budget, which keeps guessing impractically slow.
Times are the service's clock's (``director.clock``), so tests move them with ``task.Clock``.
"""

from __future__ import annotations

from director.clock import Clock

WINDOW_SECONDS = 15 * 60
FREE_FAILURES = 5
MAX_DELAY_SECONDS = 15 * 60
ADDRESS_FAILURES = 100


class LoginThrottle:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._by_email: dict[str, list[float]] = {}
        self._by_address: dict[str, list[float]] = {}

    def _recent(self, table: dict[str, list[float]], key: str) -> list[float]:
        cutoff = self.clock.seconds() - WINDOW_SECONDS
        failures = [t for t in table.get(key, ()) if t > cutoff]
        if failures:
            table[key] = failures
        else:
            table.pop(key, None)
        return failures

    def retry_after(self, email: str, address: str) -> int:
        """Seconds to wait before this attempt may be made; 0 when it may go ahead."""
        now = self.clock.seconds()
        by_address = self._recent(self._by_address, address)
        if len(by_address) >= ADDRESS_FAILURES:
            return max(1, int(by_address[0] + WINDOW_SECONDS - now) + 1)
        by_email = self._recent(self._by_email, email)
        if len(by_email) < FREE_FAILURES:
            return 0
        delay = min(MAX_DELAY_SECONDS, 2 ** (len(by_email) - FREE_FAILURES))
        wait = by_email[-1] + delay - now
        return max(0, int(wait) + (1 if wait > int(wait) else 0))

    def failed(self, email: str, address: str) -> None:
        now = self.clock.seconds()
        self._by_email.setdefault(email, []).append(now)
        self._by_address.setdefault(address, []).append(now)
        if len(self._by_email) > 100_000:  # bound memory under a spray of random emails
            self._by_email.clear()

    def succeeded(self, email: str) -> None:
        self._by_email.pop(email, None)
