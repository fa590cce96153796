"""CPU seconds and RSS of a process tree from /proc (psutil is not installed in this venv)."""

from __future__ import annotations

import itertools
import os
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                children.setdefault(int(st[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int], descendants: bool = True) -> float:
    """utime + stime of the processes and of their descendants (live ones, plus reaped children's cutime);
    ``descendants=False``: of the processes alone (the bench process, not the workers it started)."""
    total = 0.0
    for root in pids:
        if not descendants:
            st = _stat(root)
            total += sum(int(x) for x in st[11:13]) / CLK_TCK if st else 0.0
            continue
        for p in tree(root):
            st = _stat(p)
            if st:  # fields 14..17 of stat: utime stime cutime cstime -> index 11..14 here
                total += sum(int(x) for x in st[11:15]) / CLK_TCK
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for root in pids:
        for p in tree(root):
            st = _stat(p)
            if st:
                total += int(st[21]) * PAGE
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; /proc/stat: user, nice, system, irq, softirq), so
    a phase can say how much of the machine it used, the broker and everything else included."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave this VM's cores to others while they wanted to run (/proc/stat steal): a
    phase with steal ran on less machine than it seemed, one way run-to-run noise on a VM shows."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return int(fields[7]) / CLK_TCK if len(fields) > 7 else 0.0


class CpuSampler:
    """Samples (wall time, cpu seconds of process trees, busy and stolen seconds of the machine) every ``interval``
    s, to read any of them over any window."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        self.pids, self.interval = pids, interval
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), cpu_seconds(self.pids), machine_busy_seconds(), machine_steal_seconds()))
            self._stop.wait(self.interval)

    def at(self, t: float) -> float:
        """CPU seconds of the processes at wall time ``t`` (linear interpolation between samples)."""
        return self._interpolate(t, 1) if self.samples else cpu_seconds(self.pids)

    def machine_at(self, t: float) -> float:
        """Busy seconds of the machine at wall time ``t``."""
        return self._interpolate(t, 2) if self.samples else machine_busy_seconds()

    def steal_at(self, t: float) -> float:
        """Stolen seconds of the machine at wall time ``t``."""
        return self._interpolate(t, 3) if self.samples else machine_steal_seconds()

    def _interpolate(self, t: float, i: int) -> float:
        s = self.samples
        if t <= s[0][0]:
            return s[0][i]
        for a, b in itertools.pairwise(s):
            if a[0] <= t <= b[0]:
                return a[i] + (b[i] - a[i]) * (t - a[0]) / max(b[0] - a[0], 1e-9)
        return s[-1][i]
