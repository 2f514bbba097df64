"""Bounded load test of the gRPC service on loopback: K concurrent real-time StreamRender clients.

Starts ``avatar serve`` as a subprocess (so its RSS is the server's alone), then for each K in
``--levels`` runs K clients at once; each sends ``--seconds`` of real speech in 40 ms chunks at
real-time rate (like a microphone) and receives paced frames. Measured per stream (median over
streams, all runs of a level pooled):

- ``first_frame_s``: first audio chunk sent -> frame 0 received (what a user waits for);
- ``server_latency_s``: the moment the client had sent enough audio for frame 0 (its own 40 ms
  plus the header's ``lookahead_s``) -> frame 0 received: the server's own latency, i.e. render +
  queueing + transport, without the audio the algorithm must wait for;
- ``fps``: frames / (last frame - first frame) per stream (25 = keeps up in real time);
- ``render_ms``: per-frame render time of one offline Render call (no pacing), measured first;
- errors (any non-OK status) and the server's RSS before/after the level.

Usage::

    python -m avatar_bench.bench_service --store /tmp/store --avatar tiny --seconds 10 --levels 1,2,4

Prints a table and appends it to ``bench/RESULTS.md`` (machine, git commit, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from avatar_bench.common import append_results
from avatar_bench.common import commit as _commit
from avatar_bench.common import machine as _machine

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-" + os.urandom(8).hex()
CHUNK_S = 0.04


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_stream(target: str, avatar: str, audio: np.ndarray, size: int | None, out: dict) -> None:
    """Run one real-time StreamRender session; fills ``out`` with timings or an error."""
    import grpc

    from avatar_service.client import AvatarClient

    step = int(CHUNK_S * 16000)
    sent = {}

    def chunks():
        t0 = time.monotonic()
        sent["t0"] = t0
        for i, s in enumerate(range(0, len(audio), step)):
            time.sleep(max(0.0, t0 + i * CHUNK_S - time.monotonic()))
            yield audio[s : s + step]

    try:
        with AvatarClient(target, token=TOKEN) as c:
            call = c.stream(avatar, chunks(), {"size": size} if size else None, decode=False)
            frames = [f.received for f in call]
        lookahead = call.header.lookahead_s
        enough = sent["t0"] + 1 / 25 + lookahead  # audio for frame 0 + its lookahead has been sent by then
        out.update(
            frames=len(frames),
            first_frame_s=frames[0] - sent["t0"],
            server_latency_s=frames[0] - enough,
            lookahead_s=lookahead,
            fps=(len(frames) - 1) / max(frames[-1] - frames[0], 1e-9),
        )
    except grpc.RpcError as e:
        out["error"] = f"{e.code().name}: {e.details()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="avatar store holding --avatar")
    ap.add_argument("--avatar", required=True)
    ap.add_argument("--audio", default=str(ROOT.parent / "shared" / "data" / "audio" / "eng.wav"))
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per stream (the fixed time of a run)")
    ap.add_argument("--levels", default="1,2,4", help="concurrent streams per level")
    ap.add_argument("--runs", type=int, default=1, help="runs per level (medians pool all streams)")
    ap.add_argument("--size", type=int, default=None, help="output frame side (default: the avatar's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)

    from avatar.media import load_audio
    from avatar_service.client import AvatarClient

    audio = load_audio(args.audio)[: int(args.seconds * 16000)]
    load0 = os.getloadavg()[0]
    levels = [int(k) for k in args.levels.split(",")]
    cmd = [
        sys.executable,
        "-m",
        "avatar.cli",
        "serve",
        "--store",
        args.store,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
    ]
    if args.device:
        cmd += ["--device", args.device]
    import tempfile

    cfg = Path(tempfile.mkstemp(prefix="bench_server_", suffix=".json")[1])
    cfg.write_text(json.dumps({"max_streams": max(levels) + 1, "max_audio_s": args.seconds + 5}))
    cmd += ["--config", str(cfg)]
    server = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, AVATAR_TOKENS=f"{TOKEN}=admin"),
    )
    rows = []
    try:
        port = json.loads(server.stdout.readline())["port"]
        target = f"127.0.0.1:{port}"
        with AvatarClient(target, token=TOKEN) as c:  # warm-up (loads the avatar) + offline render time
            opts = {"size": args.size} if args.size else None
            list(c.render(args.avatar, _wav_bytes(audio[:3200]), opts, decode=False))
            call = c.render(args.avatar, _wav_bytes(audio[: 16000 // 2]), opts, decode=False)  # 0.5 s
            n = sum(1 for _ in call)
            render_ms = 1000 * call.summary.render_s / max(n, 1)
        for k in levels:
            rss0 = _rss_mb(server.pid)
            results = []
            for _ in range(args.runs):
                outs = [{} for _ in range(k)]
                threads = [
                    threading.Thread(target=one_stream, args=(target, args.avatar, audio, args.size, o)) for o in outs
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                results += outs
            ok = [r for r in results if "error" not in r]
            med = lambda key: statistics.median(r[key] for r in ok) if ok else float("nan")  # noqa: E731
            rows.append(
                {
                    "K": k,
                    "streams": len(results),
                    "errors": len(results) - len(ok),
                    "first_frame_s": med("first_frame_s"),
                    "server_latency_s": med("server_latency_s"),
                    "lookahead_s": med("lookahead_s"),
                    "fps": med("fps"),
                    "render_ms": render_ms,
                    "rss_before_mb": rss0,
                    "rss_after_mb": _rss_mb(server.pid),
                }
            )
            for r in results:
                if "error" in r:
                    print("error:", r["error"], file=sys.stderr)
    finally:
        server.terminate()
        server.wait(30)
        cfg.unlink(missing_ok=True)

    head = (
        "| K | streams | errors | first frame s | server latency s | lookahead s | frames/s per stream "
        "| render ms/frame (offline) | server RSS MB before -> after |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['streams']} | {r['errors']} | {r['first_frame_s']:.3f} | "
            f"{r['server_latency_s']:.3f} | {r['lookahead_s']:.2f} | {r['fps']:.1f} | {r['render_ms']:.1f} | "
            f"{r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        meta = (
            f"\n## bench_service: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"commit {_commit()}\n\nMachine: {_machine()}. Avatar `{args.avatar}` "
            f"(size {args.size or 'native'}), {args.seconds:.0f} s of `{Path(args.audio).name}` per stream in "
            f"{CHUNK_S * 1000:.0f} ms real-time chunks, realtime pacing on, {args.runs} run(s) per level; "
            f"medians over streams. Load average at start: {load0:.1f}.\n\n"
        )
        append_results(meta + table + "\n")
    return 0


def _wav_bytes(x: np.ndarray) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
