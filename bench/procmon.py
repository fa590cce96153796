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


class CpuSampler:
    """Samples (wall time, cpu seconds) of process trees every ``interval`` s, to read CPU over any window."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        self.pids, self.interval = pids, interval
        self.samples: list[tuple[float, float]] = []
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
            self.samples.append((time.time(), cpu_seconds(self.pids)))
            self._stop.wait(self.interval)

    def at(self, t: float) -> float:
        """CPU seconds at wall time ``t`` (linear interpolation between samples)."""
        s = self.samples
        if not s:
            return cpu_seconds(self.pids)
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
        return s[-1][1]
