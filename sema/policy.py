"""When things happen: which ``update()`` calls average, when the EMA is switched into the model,
and the counters that decide it.

The decay schedule (:mod:`sema.schedules`) runs on the device from a device step counter. The
policies here that count calls (``update_every > 1``, an int ``switch_every``,
``skip_nonfinite``) count on the host; the default policy counts nothing on the host, so every
call is an update and the device step is the count.
"""

from __future__ import annotations

from sema.schedules import DecaySchedule


class SwitchPolicy:
    """The update/switch policy of one ``SwitchEMA`` and its host counters.

    A switch happens at count ``c`` (1-based: epochs for ``switch_every="epoch"``, update calls
    for an int) when ``switch_start < c <= switch_end`` and ``c % K == 0``.
    """

    def __init__(
        self,
        schedule: DecaySchedule,
        switch_every: str | int | None,
        switch_start: int,
        switch_end: int | None,
        skip_nonfinite: bool,
    ) -> None:
        check_switch_policy(switch_every, switch_start, switch_end)
        self.schedule = schedule
        self.switch_every = switch_every
        self.switch_start = switch_start
        self.switch_end = switch_end
        self.skip_nonfinite = bool(skip_nonfinite)
        self.calls = 0
        self.epochs = 0
        self.num_switches = 0
        self.num_skipped = 0

    @property
    def counts_on_host(self) -> bool:
        """Whether a policy needs the host call counter (not capturable, not compilable)."""
        return self.schedule.update_every > 1 or isinstance(self.switch_every, int) or self.skip_nonfinite

    def count_call(self, switch: bool) -> tuple[bool, bool]:
        """Count one ``update()`` call (only where :attr:`counts_on_host`); returns (whether this
        call averages, whether it switches)."""
        self.calls += 1
        if isinstance(self.switch_every, int) and self.switch_due(self.calls, self.switch_every):
            switch = True
        every = self.schedule.update_every
        if self.schedule.compensate:  # calls K, 2K, ...: the update stands for the K steps before it
            return self.calls % every == 0, switch
        return (self.calls - 1) % every == 0, switch  # calls 1, K + 1, 2K + 1, ... as the peers do

    def switch_due(self, count: int, every: int) -> bool:
        if count <= self.switch_start:
            return False
        if self.switch_end is not None and count > self.switch_end:
            return False
        return count % every == 0

    def end_epoch(self) -> bool:
        """Count an epoch; whether it switches."""
        self.epochs += 1
        return self.switch_every == "epoch" and self.switch_due(self.epochs, 1)

    def config(self) -> dict[str, object]:
        return {
            "switch_every": self.switch_every,
            "switch_start": self.switch_start,
            "switch_end": self.switch_end,
        }


def check_switch_policy(switch_every: object, switch_start: object, switch_end: object) -> None:
    if switch_every not in ("epoch", None) and (
        isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1
    ):
        raise ValueError(
            f"SwitchEMA: switch_every={switch_every!r} must be 'epoch', a positive int (steps) or None (no switch)"
        )
    if isinstance(switch_start, bool) or not isinstance(switch_start, int) or switch_start < 0:
        raise ValueError(f"SwitchEMA: switch_start={switch_start!r} must be a non-negative int")
    if switch_end is not None and (
        isinstance(switch_end, bool) or not isinstance(switch_end, int) or switch_end <= switch_start
    ):
        raise ValueError(
            f"SwitchEMA: switch_end={switch_end!r} must be None or an int greater than switch_start={switch_start}"
        )
