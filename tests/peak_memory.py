"""The peak resident memory a piece of work adds to this process (Linux ``/proc``), for the
measuring child processes of the tests and benchmarks: :func:`reset_peak` before the work,
:func:`peak_added` after it. The peak is reset through ``/proc/self/clear_refs`` and read from
``VmHWM`` (``ru_maxrss`` would carry a parent's RSS over fork + exec: a test process grown to
1.3 GB made a 250 MB request look like 1.3 GB)."""

from __future__ import annotations

from pathlib import Path


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> int:
    """Reset this process's peak resident set to its current one; returns that, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS:")


def peak_added(before: int) -> int:
    """Bytes the peak resident set rose above ``before`` (what :func:`reset_peak` returned)."""
    return _status_bytes("VmHWM:") - before
