"""How much memory this process holds: resident set size (RSS) now, and its peak over a step of work.

Linux keeps the peak RSS (``VmHWM`` in ``/proc/self/status``) and resets it when ``5`` is written to
``/proc/self/clear_refs``, so each step's own peak can be measured. Where that is refused (or off Linux) the peak
is the process's lifetime peak (``getrusage``), and :attr:`StepMemory.peak_is_lifetime` says so.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024**3


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """The resident set size now (0 where it cannot be read)."""
    value = _status_bytes("VmRSS")
    if value is not None:
        return value
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return 0


def lifetime_peak_rss_bytes() -> int:
    """The largest RSS this process has had (``getrusage``: kilobytes on Linux, bytes on macOS); on Linux
    :func:`reset_peak_rss` resets it too."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The peak RSS since the last :func:`reset_peak_rss` (the lifetime peak where there was none)."""
    value = _status_bytes("VmHWM")
    return value if value is not None else lifetime_peak_rss_bytes()


@dataclass
class StepMemory:
    """One step of work: its wall time, the RSS at its end and its peak RSS."""

    step: str
    layer: int | None
    seconds: float
    rss_end: int
    peak_rss: int
    peak_is_lifetime: bool

    def to_dict(self) -> dict:
        return asdict(self)


class StepMeter:
    """Times steps and measures their peak RSS::

    meter = StepMeter()
    with meter.step("load", layer=3):
        ...
    meter.steps  # [StepMemory(...)]
    """

    def __init__(self) -> None:
        self.steps: list[StepMemory] = []

    def step(self, name: str, layer: int | None = None) -> _Step:
        return _Step(self, name, layer)

    @property
    def peak_rss(self) -> int:
        """The largest peak over the steps measured (and the lifetime peak where steps could not be told apart)."""
        return max((s.peak_rss for s in self.steps), default=0)

    def by_step(self) -> dict[str, dict]:
        """Per step name: count, total and largest seconds, largest peak RSS."""
        out: dict[str, dict] = {}
        for s in self.steps:
            row = out.setdefault(s.step, {"count": 0, "seconds": 0.0, "max_seconds": 0.0, "peak_rss": 0})
            row["count"] += 1
            row["seconds"] += s.seconds
            row["max_seconds"] = max(row["max_seconds"], s.seconds)
            row["peak_rss"] = max(row["peak_rss"], s.peak_rss)
        return out


class _Step:
    def __init__(self, meter: StepMeter, name: str, layer: int | None):
        self.meter, self.name, self.layer = meter, name, layer

    def __enter__(self) -> _Step:
        self.windowed = reset_peak_rss()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        seconds = time.perf_counter() - self.started
        peak = peak_rss_bytes() if self.windowed else lifetime_peak_rss_bytes()
        record = StepMemory(self.name, self.layer, seconds, rss_bytes(), peak, not self.windowed)
        self.meter.steps.append(record)
