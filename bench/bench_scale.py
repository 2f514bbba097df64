"""Benchmark onboarding many speakers (issue 16, docs/SCALE.md): N ``cpu-smoke`` onboardings submitted
at once through a local Ray instance, one worker SIGKILLed once during a NeRF stage, against the same
N onboardings run one after another locally; plus the sizing numbers (CPU-minutes of preprocessing
per minute of video, disk per avatar).

Checks: every Ray onboarding finishes, no stage but the killed one runs twice, and each bundle's
manifest metrics equal the sequential bundle's (max |difference| per key is printed).

    .venv/bin/python -m avatar_bench.bench_scale --generator STORE/shared/generator [--n 4] [--cpus 2]
        [--data ../shared/data] [--preprocess-seconds 20] [--no-append]

The generator can be any shared generator (``tests/conftest.build_tiny_store`` makes a smoke one in
~15 s). Results are printed as JSON and appended to ``bench/RESULTS.md`` as a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from avatar_bench.common import append_results, commit, machine

REPO = Path(__file__).resolve().parents[1]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _clips(data: Path, n: int, out: Path) -> list[Path]:
    """n short clips: the first 4 s, 6 s, 8 s ... of the two speakers in turn."""
    from avatar_bench.bench_dataset import make_slice

    sources = [data / "speakers" / "acosta_cnn_71s.mp4", data / "speakers" / "lieu_60s_256.mp4"]
    clips = []
    for i in range(n):
        src = sources[i % len(sources)]
        clips.append(make_slice(src, 4.0 + 2 * (i // len(sources)), out / f"clip{i}.mp4"))
    return clips


def _preprocess_cpu(clip: Path, size: int, out: Path) -> dict:
    """CPU seconds (user + sys, wait4 rusage) and wall seconds of one `avatar preprocess` subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avatar.cli",
            "preprocess",
            str(clip),
            "--out",
            str(out),
            "--size",
            str(size),
            "--overwrite",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"avatar preprocess failed on {clip}")
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall, "dataset_bytes": _du(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument(
        "--preprocess-seconds", type=float, default=20.0, help="clip length for the CPU-time rows (0: skip)"
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import ray

    from avatar.pipeline.onboard import onboard
    from avatar.store import AvatarStore

    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    result: dict = {"n": args.n, "cpus": args.cpus}
    try:
        clips = _clips(args.data, args.n, tmp)
        names = [f"s{i}" for i in range(args.n)]
        seq, par = AvatarStore(tmp / "seq"), AvatarStore(tmp / "ray")
        for st in (seq, par):
            shutil.copytree(args.generator, st.generator_dir)

        # 1. sequential, local (the default path)
        t0 = time.perf_counter()
        for clip, name in zip(clips, names):
            onboard(clip, name, store=seq, preset="cpu-smoke", keep_work=True)
        result["sequential_s"] = round(time.perf_counter() - t0, 1)

        # 2. all at once through Ray, one worker killed once during a NeRF stage
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        result["ray_init_s"] = round(time.perf_counter() - t0, 1)
        killed: list = []
        errors: dict = {}
        lock = threading.Lock()

        def progress(stage, fraction, message):
            m = re.search(r"pid (\d+), attempt 1", message)
            if stage in ("head", "torso") and m:
                with lock:
                    if not killed:
                        os.kill(int(m.group(1)), signal.SIGKILL)
                        killed.append((stage, int(m.group(1))))

        def run(clip, name):
            try:
                onboard(clip, name, store=par, preset="cpu-smoke", keep_work=True, progress=progress, ray_address="")
            except Exception as e:  # reported below
                errors[name] = f"{type(e).__name__}: {e}"

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(c, n)) for c, n in zip(clips, names)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result["ray_s"] = round(time.perf_counter() - t0, 1)
        ray.shutdown()
        result["killed"] = killed
        result["errors"] = errors

        # 3. the same bundles?
        per = []
        for name, clip in zip(names, clips):
            if name in errors:
                continue
            a, b = seq.manifest(name)["metrics"], par.manifest(name)["metrics"]
            state = json.loads((par.work_dir(name) / "state.json").read_text())
            diffs = {k: abs(a[k] - b[k]) for k in a if k in b and "seconds" not in k}
            per.append(
                {
                    "name": name,
                    "clip_s": round(float(seq.manifest(name)["dataset"]["n_frames"]) / 25, 1),
                    "same_keys": set(a) == set(b),
                    "equal_metrics": sum(v == 0 for v in diffs.values()),
                    "metrics": len(diffs),
                    "max_abs_diff": max(diffs.values(), default=0.0),
                    "worst": max(diffs, key=diffs.get) if diffs else "",
                    "attempts": state.get("attempts", {}),
                    "bundle_bytes": _du(par.avatar_dir(name)),
                    "work_bytes": _du(par.work_dir(name)),
                    "seq_stage_s": seq.manifest(name)["stage_seconds"],
                    "ray_stage_s": state.get("times", {}),
                }
            )
        result["avatars"] = per

        # 4. sizing: preprocessing CPU time per minute of video, disk per avatar
        if args.preprocess_seconds > 0:
            from avatar_bench.bench_dataset import make_slice

            long_clip = make_slice(
                args.data / "speakers" / "acosta_cnn_71s.mp4", args.preprocess_seconds, tmp / "long.mp4"
            )
            for size in (128, 512):
                r = _preprocess_cpu(long_clip, size, tmp / f"ds{size}")
                result[f"preprocess_{size}px"] = {
                    **r,
                    "cpu_min_per_video_min": round(r["cpu_s"] / args.preprocess_seconds, 2),
                    "dataset_mb_per_video_min": round(r["dataset_bytes"] / 2**20 * 60 / args.preprocess_seconds, 1),
                }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1, default=str))
    if not args.no_append:
        rows = [
            "| avatar | clip (s) | Ray attempts (stages run twice) | metrics equal / total | max abs diff (key) | bundle (MB) | work dir (MB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in result.get("avatars", []):
            twice = ", ".join(s for s, n in a["attempts"].items() if n > 1) or "none"
            rows.append(
                f"| {a['name']} | {a['clip_s']} | {twice} | {a['equal_metrics']} / {a['metrics']} | "
                f"{a['max_abs_diff']:.3g} ({a['worst']}) | {a['bundle_bytes'] / 2**20:.1f} | {a['work_bytes'] / 2**20:.1f} |"
            )
        pre = [
            f"| {k.removeprefix('preprocess_')} | {v['cpu_s']:.0f} | {v['wall_s']:.0f} | "
            f"{v['cpu_min_per_video_min']} | {v['dataset_mb_per_video_min']} |"
            for k, v in result.items()
            if k.startswith("preprocess_")
        ]
        text = (
            f"\n## bench_scale: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}\n\n"
            f"machine: {machine()}; {args.n} cpu-smoke onboardings; local Ray instance with {args.cpus} CPUs; "
            f"worker killed: {result['killed']}; errors: {result['errors'] or 'none'}\n\n"
            f"sequential local: {result['sequential_s']} s; all at once through Ray: {result['ray_s']} s "
            f"(+ {result['ray_init_s']} s to start Ray)\n\n" + "\n".join(rows) + "\n"
        )
        if pre:
            text += (
                f"\npreprocessing {args.preprocess_seconds:.0f} s of acosta (`avatar preprocess` subprocess, wait4 rusage):\n\n"
                "| size | CPU s | wall s | CPU-min per video-min | dataset MB per video-min |\n|---|---|---|---|---|\n"
                + "\n".join(pre)
                + "\n"
            )
        append_results(text)
    return 0 if not result.get("errors") and result.get("killed") else 1


if __name__ == "__main__":
    sys.exit(main())
