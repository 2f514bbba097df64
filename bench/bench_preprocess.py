"""Benchmark ``avatar preprocess``: throughput (frames/s) and peak RSS, per clip length and size.

Each run is a fresh ``avatar preprocess`` subprocess (so peak RSS is that run's own, read from
``wait4``'s rusage). Rows: the full acosta clip (71 s) at 512 and 256 px, and its first 20 s at
512 px (memory must stay flat in clip length: frames stream into memory-mapped arrays). Prints a
table and appends it to ``bench/RESULTS.md`` with machine, git commit and date (median of runs).

    .venv/bin/python bench/bench_preprocess.py [--runs 3] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from avatar_bench.common import append_results
from avatar_bench.common import commit as _commit
from avatar_bench.common import machine as _machine

REPO = Path(__file__).resolve().parents[1]


def head_slice(src: Path, dst: Path, seconds: float) -> Path:
    """Stream-copy (no re-encode) the packets of the first ``seconds`` of ``src`` into ``dst``."""
    import av

    with av.open(str(src)) as ic, av.open(str(dst), "w") as oc:
        streams = [s for s in ic.streams if s.type in ("video", "audio")]
        out = {s.index: oc.add_stream_from_template(s) for s in streams}
        for pkt in ic.demux(*streams):
            if pkt.dts is None or pkt.pts is None:
                continue
            if float(pkt.pts * pkt.time_base) >= seconds:
                continue
            pkt.stream = out[pkt.stream.index]
            oc.mux(pkt)
    return dst


def run_once(video: Path, size: int, workdir: Path) -> tuple[float, float, int]:
    """One preprocess subprocess -> (seconds, peak RSS GiB, n_frames)."""
    out = workdir / f"ds_{size}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "avatar.cli",
        "preprocess",
        str(video),
        "--out",
        str(out),
        "--size",
        str(size),
        "--quiet",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"preprocess failed:\n{err[-2000:]}")
    n = json.loads((out / "manifest.json").read_text())["n_frames"]
    shutil.rmtree(out, ignore_errors=True)
    return seconds, usage.ru_maxrss / 2**20, n  # ru_maxrss is KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per row (median reported)")
    ap.add_argument("--data", default=os.environ.get("AVATAR_TEST_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    clip = Path(args.data) / "speakers" / "acosta_cnn_71s.mp4"
    if not clip.is_file():
        raise SystemExit(f"{clip} not found; pass --data DIR")
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        short = head_slice(clip, tmp / "acosta_20s.mp4", 20.0)
        for name, video, size in (
            ("acosta 71 s", clip, 512),
            ("acosta 71 s", clip, 256),
            ("acosta first 20 s", short, 512),
        ):
            res = [run_once(video, size, tmp) for _ in range(args.runs)]
            sec = statistics.median(r[0] for r in res)
            rss = statistics.median(r[1] for r in res)
            n = res[0][2]
            rows.append((name, size, n, sec, n / sec, rss))
            print(f"  {name} @ {size}px: {sec:.1f} s, {n / sec:.1f} frames/s, peak RSS {rss:.2f} GiB", file=sys.stderr)
    header = "| clip | size (px) | frames | wall (s) | frames/s | peak RSS (GiB) |\n|---|---|---|---|---|---|"
    lines = [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} |" for r in rows]
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_append:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        block = (
            f"\n## preprocess (bench/bench_preprocess.py)\n\nmachine: {_machine()}; commit {_commit()}; {stamp}; "
            f"median of {args.runs} run(s); load average before/after {load0:.1f}/{os.getloadavg()[0]:.1f} (shared machine); "
            "end-to-end CLI wall time incl. imports, mel features, previews.\n\n{table}\n"
        )
        append_results(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
