"""How many threads torch runs: the cores this process may really use.

Why not torch's own count: torch counts the host's cores, but a container with a CPU quota (docker
`--cpus`, a Kubernetes limit) or a process pinned to some cores (taskset, cpusets) gets fewer, and
OpenMP threads beyond them spin for cores they never get: on a busy 2-core machine the default
server took 8-45 s per 64x64 image where one thread took 0.4-0.9 s. No library answers this on
Python 3.11 (`os.process_cpu_count` of 3.13 reads the affinity mask, not the quota), so it is read
here from the kernel's own files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cores(cgroup: Path = CGROUP, membership: Path = PROC_CGROUP) -> int:
    """The cores this process may use: its affinity mask, capped by its cgroup's CPU quota
    (rounded up: a quota of 1.5 cores keeps two threads busy half the time each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup, membership)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def cpu_quota(cgroup: Path = CGROUP, membership: Path = PROC_CGROUP) -> float | None:
    """The CPU quota in cores of the cgroup this process is in, the tightest of it and its
    ancestors (cgroup v2's `cpu.max`, v1's CFS files), or None for none. Inside a container the
    process's cgroup is the mount's root; on a host it is a folder below it (systemd's, a bench's)."""
    quotas = [quota for folder in _own_cgroups(cgroup, membership) if (quota := _quota(folder)) is not None]
    return min(quotas, default=None)


def _own_cgroups(cgroup: Path, membership: Path) -> list[Path]:
    """The folders of this process's CPU cgroup and of its ancestors, from /proc/self/cgroup."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's one hierarchy
            found.append((cgroup, path))
        elif "cpu" in controllers.split(","):
            found.append((cgroup / controllers, path))
    folders = []
    for root, path in found or [(cgroup, "/"), (cgroup / "cpu", "/")]:
        parts = [part for part in path.split("/") if part]
        folders += [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return folders


def _quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def torch_threads(setting: int) -> int:
    """TORCH_THREADS, or with 0 (the default) the cores this process may use."""
    return setting or usable_cores()
