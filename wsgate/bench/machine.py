"""What the rest of the machine does while a benchmark measures: the CPU every process
outside the benchmark's own process tree used, from ``/proc`` (Linux only).

The machine may be shared (other test stacks, builds): a busy neighbour lowers every
figure and makes rounds vary. :class:`OtherLoad` measures it over a window so that the
report can say so, and :func:`warn_if_busy` says it on stderr.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("wsgate.bench")

#: Above this share of the machine's CPU used by other processes, a run warns that its
#: figures are low and vary (10%: 0.2 core on 2 cores).
BUSY_SHARE = 0.10


def machine_cpu_s() -> float:
    """CPU time all processes of the machine have used (every state but idle and
    iowait), from the first line of ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...; guest time is in user.
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root_pid: int, *, ended_children: bool = False) -> float:
    """CPU time (user + system) process ``root_pid`` and every live descendant have used.

    With ``ended_children``, each process's waited-for children count too (a process's
    ``cutime``/``cstime``), so a load generator or server that stops during a window
    still counts: its time moves from the live tree to its parent's children time.
    Without, processes that end meanwhile are missed.
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    # Fields 14-17 of proc(5): utime, stime, cutime, cstime (indices after the command).
    last = 15 if ended_children else 13
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while listed
            continue
        # The command (field 2) is in parentheses and may hold blanks: split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # field 4 of proc(5): ppid
        cpu[pid] = sum(int(f) for f in fields[11:last]) / tick
    total = 0.0
    for pid, seconds in cpu.items():
        ancestor = pid
        # A process belongs to the tree if root_pid is on its chain of parents.
        while ancestor > 1 and ancestor != root_pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root_pid:
            total += seconds
    return total


def own_tree_cpu_s() -> float:
    """CPU time this process and all its descendants have used, those that ended and were
    waited for included."""
    return tree_cpu_s(os.getpid(), ended_children=True)


@dataclass(frozen=True)
class OtherLoad:
    """CPU used outside the benchmark's process tree over one window."""

    #: In cores (CPU seconds per second of the window).
    cores: float
    #: The same as a share of the whole machine (0..1).
    share: float

    @property
    def busy(self) -> bool:
        """More than BUSY_SHARE of the machine: the figures are low and vary."""
        return self.share > BUSY_SHARE


class OtherLoadMeter:
    """``start()`` at the beginning of a window, ``stop()`` at its end."""

    def __init__(self) -> None:
        self._at = 0.0
        self._machine = 0.0
        self._own = 0.0

    def start(self) -> None:
        self._at = time.monotonic()
        self._machine = machine_cpu_s()
        self._own = own_tree_cpu_s()

    def stop(self) -> OtherLoad:
        """The load since ``start()``; never negative (the two reads are not atomic)."""
        wall_s = max(time.monotonic() - self._at, 1e-9)
        machine = machine_cpu_s() - self._machine
        own = own_tree_cpu_s() - self._own
        cores = max(0.0, machine - own) / wall_s
        return OtherLoad(cores=cores, share=cores / (os.cpu_count() or 1))


def warn_if_busy(load: OtherLoad, what: str) -> None:
    """Say on stderr (the bench's log) when ``load`` is above BUSY_SHARE."""
    if load.busy:
        log.warning(
            "other processes used %.0f%% of the CPU (%.2f core) during %s: the machine is "
            "shared, these figures are low and vary from run to run",
            100 * load.share,
            load.cores,
            what,
        )
