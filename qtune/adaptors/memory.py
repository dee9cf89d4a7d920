"""How much memory this process holds and may hold: resident set, its peak over a stretch of code,
and the memory limit of the container (cgroup) it runs in. Linux only; elsewhere every reading is None.

The peak of a stretch of code is the kernel's high-water mark (`VmHWM` in /proc/self/status), reset at
its start by writing 5 to /proc/self/clear_refs (Linux >= 4.0). The reset also lowers
`getrusage().ru_maxrss`, so the process-wide peak is kept here (`process_peak_bytes`) across resets.
Where the reset is refused, a window reports the process's peak so far (an upper bound, `exact` False).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 60
"""cgroup v1 writes "no limit" as a huge number (9223372036854771712); anything above this is none."""

_open_windows: list[PeakWindow] = []
_lifetime_peak = 0


def _status_kib(field: str, proc: Path = PROC) -> int | None:
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """The resident set of this process now."""
    return _status_kib("VmRSS")


def _hwm_bytes() -> int | None:
    return _status_kib("VmHWM")


def process_peak_bytes() -> int | None:
    """The largest resident set this process ever had (survives the resets of `PeakWindow`)."""
    current = _hwm_bytes()
    if current is None:
        return None
    return max(current, _lifetime_peak)


def _reset_peak() -> bool:
    """Lower the high-water mark to the current RSS; False when the kernel refuses."""
    global _lifetime_peak
    current = _hwm_bytes()
    if current is None:
        return False
    _lifetime_peak = max(_lifetime_peak, current)
    for window in _open_windows:  # what they saw so far must survive the reset
        window.seen = max(window.seen, current)
    try:
        (PROC / "self" / "clear_refs").write_text("5")
    except OSError as exc:
        logger.debug("cannot reset the peak RSS (%s): peaks are upper bounds", exc)
        return False
    return True


class PeakWindow:
    """The peak RSS of the process while a `with` block runs: `peak_bytes` after it (None off Linux).

    `exact` says the peak is this block's own; False: it is the process's peak so far (no reset)."""

    def __init__(self) -> None:
        self.seen = 0
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.exact = False

    def __enter__(self) -> PeakWindow:
        self.exact = _reset_peak()
        self.start_bytes = rss_bytes()
        _open_windows.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        _open_windows.remove(self)
        current = _hwm_bytes()
        self.peak_bytes = None if current is None else max(current, self.seen)

    @property
    def added_bytes(self) -> int | None:
        """How far the peak rose above the RSS at the start."""
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return max(0, self.peak_bytes - self.start_bytes)


def _cgroup_paths(proc: Path) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) of this process's cgroup, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def container_memory_limit(cgroup: Path = CGROUP, proc: Path = PROC) -> int | None:
    """The memory limit of this process's cgroup in bytes (a pod's resources.limits.memory), None when
    there is none. Reads cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`, at the root of the mount
    (a container's own cgroup namespace) and under the process's cgroup path; the smallest wins."""
    v2, v1 = _cgroup_paths(proc)
    candidates = [cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"]
    if v2 and v2 != "/":
        candidates.append(cgroup / v2.lstrip("/") / "memory.max")
    if v1 and v1 != "/":
        candidates.append(cgroup / "memory" / v1.lstrip("/") / "memory.limit_in_bytes")
    limits = []
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if re.fullmatch(r"\d+", text) and int(text) < NO_LIMIT:
            limits.append(int(text))
    return min(limits) if limits else None


def human_bytes(value: float | None) -> str:
    """2.31 GiB, 456 MiB: binary units, like the Kubernetes quantities (2Gi) a user writes."""
    if value is None:
        return "unknown"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.{2 if unit == 'GiB' else 0}f} {unit}"
    return f"{int(value)} B"
