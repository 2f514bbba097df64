"""`python -m avatar_bench.bench_gpu --dataset DIR --quick` runs end to end on CPU and reports every section."""

from __future__ import annotations

import json
import math
import sys

from synthetic_dataset import make_dataset


def test_bench_gpu_quick_on_cpu(tmp_path):
    from avatar_bench.bench_gpu import main

    ds = make_dataset(tmp_path / "ds", n_frames=30, size=32)
    results, rows_json = tmp_path / "RESULTS.md", tmp_path / "rows.json"
    assert (
        main(
            [
                "--dataset",
                str(ds),
                "--quick",
                "--minutes",
                "0.05",
                "--device",
                "cpu",
                "--results",
                str(results),
                "--json",
                str(rows_json),
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    rows = json.loads(rows_json.read_text())
    sections = {r["section"] for r in rows}
    assert {"build", "encoding", "data", "train", "quality", "memory", "render", "onboard"} <= sections
    by_item = {r["item"]: r for r in rows}
    assert float(by_item["validation PSNR, full frame"]["value"]) > 5
    assert any(r["item"].startswith("head+torso 32 px, batch 2") for r in rows)
    assert math.isfinite(float(by_item["cpu-smoke onboarding of 5 min (extrapolated)"]["value"].replace(",", "")))
    steps = json.loads((tmp_path / "model" / "head" / "metrics.json").read_text())["steps"]
    assert 1 <= steps <= 40  # the wall-time budget (2 s for the head) or the preset's 40 steps
    text = results.read_text()
    assert "## bench_gpu --quick" in text and "| train | head NeRF steps/s (cpu-smoke)" in text
    assert main(["--dataset", str(tmp_path / "nope"), "--quick", "--no-results"]) == 2


def test_gpu_bundle_script_and_code(tmp_path):
    """The bundle's gpu_check.sh is valid bash that installs offline, and its code/ holds what the GPU
    check runs (the full bundle needs the media, mediapipe and PyPI: `make gpu-bundle`)."""
    import subprocess

    from avatar_bench import gpu_bundle

    script = tmp_path / "gpu_check.sh"
    script.write_text(gpu_bundle.GPU_CHECK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = gpu_bundle.GPU_CHECK
    assert "--no-index --find-links wheels" in text and "pytest -q -m cuda" in text and "avatar_bench.bench_gpu" in text
    gpu_bundle._copy_code(tmp_path / "code")
    for f in (
        "avatar/nerf/inference.py",
        "avatar_bench/bench_gpu.py",
        "avatar_bench/common.py",
        "tests/test_nerf_cuda.py",
        "tests/synthetic_dataset.py",
        "pyproject.toml",
    ):
        assert (tmp_path / "code" / f).is_file(), f
    assert not (tmp_path / "code" / "bench").exists()
    # the bare host runs it uninstalled, with PYTHONPATH=code (gpu_check.sh)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "code")}
    r = subprocess.run(
        [sys.executable, "-c", "import avatar_bench.bench_gpu as b; print(b.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(tmp_path / "code" / "avatar_bench" / "bench_gpu.py")
    assert gpu_bundle.LIMIT_BYTES == 60 * 2**20
