"""avatar.runtime: usable CPU count from affinity + cgroup quota, thread pools sized to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avatar import runtime

REPO = Path(__file__).resolve().parents[1]


def test_cgroup_v2_quota(tmp_path):
    d = tmp_path / "user.slice" / "job"
    d.mkdir(parents=True)
    (d / "cpu.max").write_text("150000 100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path, "0::/user.slice/job\n") == pytest.approx(1.5)
    (d / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpu_limit(tmp_path, "0::/user.slice/job\n") is None


def test_cgroup_v1_quota(tmp_path):
    d = tmp_path / "cpu" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("50000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    proc = "4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n"
    # the v1 "cpu,cpuacct" hierarchy is mounted as cpu/ here; the innermost cgroup wins over the root
    assert runtime.cgroup_cpu_limit(tmp_path, proc) == pytest.approx(0.5)
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cgroup_cpu_limit(tmp_path, proc) is None
    assert runtime.cgroup_cpu_limit(tmp_path / "missing", proc) is None


def test_usable_cpus_min_of_affinity_and_quota(monkeypatch):
    monkeypatch.delenv(runtime.ENV_THREADS, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 2.5)
    assert runtime.usable_cpus() == 3  # ceil(2.5) < 6
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 0.2)
    assert runtime.usable_cpus() == 1
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert runtime.usable_cpus() == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert runtime.usable_cpus() == 4
    monkeypatch.setenv(runtime.ENV_THREADS, "2")
    assert runtime.usable_cpus() == 2
    monkeypatch.setenv(runtime.ENV_THREADS, "zero")
    with pytest.raises(ValueError, match="AVATAR_THREADS"):
        runtime.usable_cpus()


def test_configure_threads_follows_affinity_in_a_fresh_process():
    """A process pinned to one CPU gets one torch thread from the stages' helper, and OpenMP is told
    to let idle threads sleep (OMP_WAIT_POLICY=PASSIVE is set before torch loads)."""
    code = (
        "import json, os; import avatar; import torch; from avatar.runtime import configure_threads, usable_cpus; "
        "n = configure_threads(); "
        "print(json.dumps({'usable': usable_cpus(), 'n': n, 'torch': torch.get_num_threads(), "
        "'omp': os.environ.get('OMP_WAIT_POLICY')}))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AVATAR_THREADS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    cpu = sorted(os.sched_getaffinity(0))[0]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"usable": 1, "n": 1, "torch": 1, "omp": "PASSIVE"}
