"""CPU time, memory and threads of a process and its descendants, read from /proc.

CPU is the kernel's own accounting (utime + stime), so "µs per request" is
what the process really burnt, whichever thread did the work. Descendants are
included so a processor that forks workers is measured whole.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


@dataclass(frozen=True)
class Usage:
    cpu_s: float  # user + system CPU seconds since each process started
    rss_bytes: int
    threads: int
    processes: int


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name; index ``n - 3`` is field ``n`` of proc(5)."""
    text = (_PROC / str(pid) / "stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _children(parent: int) -> list[int]:
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == parent:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all of its descendants."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        queue.extend(_children(current))
    return pids


def _status_value(pid: int, key: str) -> int:
    for line in (_PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def usage(pid: int) -> Usage:
    """CPU, RSS and thread count summed over ``pid``'s process tree."""
    cpu = 0.0
    rss = threads = count = 0
    for member in tree(pid):
        try:
            fields = _stat_fields(member)
            cpu += (int(fields[11]) + int(fields[12])) * _TICK_S
            rss += _status_value(member, "VmRSS") * 1024
            threads += _status_value(member, "Threads")
            count += 1
        except OSError:
            continue
    return Usage(cpu, rss, threads, count)


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (user, system, irq, steal)."""
    fields = (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def children_cpu_s() -> float:
    """CPU seconds of this process's finished (waited-for) children, e.g. wrk runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
