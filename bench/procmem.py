"""Resident-memory readings of this process (Linux /proc), shared by the benchmarks."""

from pathlib import Path


def rss_bytes(field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Make ``VmHWM`` start again from the current resident size."""
    Path("/proc/self/clear_refs").write_text("5")
