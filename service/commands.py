"""``avatar serve`` (the gRPC renderer) and ``avatar client ...`` (its command-line client)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from avatar.atomic import check_output_file
from avatar.errors import InvalidInput

log = logging.getLogger(__name__)


# ---- serve ------------------------------------------------------------------------------------
def _serve(args) -> int:
    from avatar.config import from_dict, load_json, to_dict
    from avatar.store import default_store_root
    from avatar_service.auth import load_tokens
    from avatar_service.observability import use_json_logs
    from avatar_service.server import AvatarServer, ServerConfig

    cfg = from_dict(ServerConfig, load_json(args.config)) if args.config else ServerConfig()
    for key in ("host", "port", "metrics_port", "device", "tls_cert", "tls_key", "jobs", "ray_address"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    if args.metrics_port is not None and args.metrics_port < 0:
        cfg.metrics_port = None
    cfg.store = str(args.store or cfg.store or default_store_root())
    tokens = load_tokens(args.tokens_file)
    use_json_logs(logging.DEBUG if args.debug else logging.INFO)
    server = AvatarServer(cfg, tokens).start()
    web = None
    if args.web is not None:  # the browser console (service/web.py), same store, tokens and host
        from avatar_service.server import http_host
        from avatar_service.web import WebServer

        web = WebServer(
            server.servicer, tokens, host=http_host(cfg.host), port=args.web, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key
        ).start()
    log.info("server config", extra={"fields": {"config": to_dict(cfg), "tokens": len(tokens)}})
    print(
        json.dumps(
            {
                "event": "listening",
                "port": server.port,
                "metrics_port": server.metrics_port,
                **({"web_port": web.port, "web_url": web.url} if web else {}),
            }
        ),
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("shutting down")
    if web is not None:
        web.stop()
    server.stop(grace=5.0)
    return 0


# ---- client -----------------------------------------------------------------------------------
def _client(args):
    from avatar_service.client import AvatarClient

    token = args.token or os.environ.get("AVATAR_TOKEN")
    if not token:
        raise InvalidInput("no API token: pass --token or set AVATAR_TOKEN")
    return AvatarClient(args.target, token=token, tls_ca=args.tls_ca)


def _rpc_errors(fn):
    """Turn a grpc.RpcError into a one-line message and exit code 1."""

    def run(args) -> int:
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1

    return run


def _options(args) -> dict:
    return {
        "emotion": args.emotion,
        "emotion_strength": args.emotion_strength,
        "still": args.still or None,
        "blink": False if args.no_blink else None,
        "blink_rate": args.blink_rate,
        "temperature": args.temperature,
        "seed": args.seed,
        "size": args.size,
        "head_speed": args.head_speed,
        "head_amplitude": args.head_amplitude,
    }


def _latency(args) -> dict:
    """``block`` / ``nerf_right`` of ``avatar client stream`` (``--low-latency`` = block 2, NeRF look-ahead 1;
    explicit ``--block`` / ``--nerf-right`` win); None = the server's defaults. The server validates them."""
    low = getattr(args, "low_latency", False)
    block = args.block if args.block is not None else (2 if low else None)
    nerf_right = args.nerf_right if args.nerf_right is not None else (1 if low else None)
    return {"block": block, "nerf_right": nerf_right}


def _write_mp4(out: Path, frames, audio, fps: float, progress: bool = True) -> int:
    """Write decoded frames + the driving audio (float32 16 kHz) like ``avatar render`` (a bar unless
    not ``progress``)."""
    import itertools

    from tqdm import tqdm

    from avatar.media import VideoWriter

    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise InvalidInput("the server returned no frames")
    h, w = first.image.shape[:2]
    n = 0
    with VideoWriter(out, fps=fps, size=(w, h), audio=audio, audio_rate=16000) as writer:
        for f in tqdm(itertools.chain([first], it), desc="frames", unit="frame", disable=not progress):
            writer.write(f.image)
            n += 1
    return n


@_rpc_errors
def _cmd_list(args) -> int:
    with _client(args) as c:
        print(json.dumps(c.list_avatars(), indent=2))
    return 0


@_rpc_errors
def _cmd_get(args) -> int:
    with _client(args) as c:
        print(json.dumps(c.get_avatar(args.name), indent=2))
    return 0


@_rpc_errors
def _cmd_render(args) -> int:
    from avatar.media import load_audio

    check_output_file(args.out)
    audio = load_audio(args.audio)  # validates locally and gives the track to mux
    with _client(args) as c:
        call = c.render(args.avatar, args.audio, _options(args), image_format=args.format)
        n = _write_mp4(args.out, call, audio, 25.0, progress=not getattr(args, "quiet", False))
    print(
        json.dumps(
            {"out": str(args.out), "frames": n, "render_s": round(call.summary.render_s, 3) if call.summary else None}
        )
    )
    return 0


@_rpc_errors
def _cmd_stream(args) -> int:
    import time

    from avatar.media import load_audio

    check_output_file(args.out)
    audio = load_audio(args.audio)
    step = max(1, int(args.chunk_ms * 16))

    def chunks():
        t0 = time.monotonic()
        for i, s in enumerate(range(0, len(audio), step)):
            if args.realtime:  # send audio as a live microphone would
                time.sleep(max(0.0, t0 + s / 16000 - time.monotonic()))
            if args.emotion_at is not None and s <= args.emotion_at * 16000 < s + step:
                yield {"emotion": args.switch_emotion}
            yield audio[s : s + step]

    with _client(args) as c:
        # no idle frames: the MP4 holds exactly the file's audio, however the chunks were delayed
        call = c.stream(
            args.avatar,
            chunks(),
            _options(args),
            image_format=args.format,
            realtime=args.realtime,
            idle_frames=False,
            frame_audio=False,
            **_latency(args),
        )
        n = _write_mp4(args.out, call, audio, 25.0, progress=not getattr(args, "quiet", False))
    s = call.summary
    h = call.header
    print(
        json.dumps(
            {
                "out": str(args.out),
                "frames": n,
                "lookahead_s": round(h.lookahead_s, 4) if h else None,
                "block": h.block if h else None,
                "nerf_right": h.nerf_right if h else None,
                "first_frame_latency_s": round(s.first_frame_latency_s, 3) if s else None,
            }
        )
    )
    return 0


@_rpc_errors
def _cmd_onboard(args) -> int:
    with _client(args) as c:
        job = c.onboard(args.video, args.name, preset=args.preset, overwrite=args.overwrite)
        print(json.dumps(job), flush=True)
        if args.wait:
            for job in c.watch_job(job["job_id"]):
                print(json.dumps(job), flush=True)
            return 0 if job["state"] == "SUCCEEDED" else 1
    return 0


@_rpc_errors
def _cmd_jobs(args) -> int:
    with _client(args) as c:
        for job in c.list_jobs(avatar=args.avatar or "", limit=args.limit):
            print(json.dumps(job))
    return 0


@_rpc_errors
def _cmd_job(args) -> int:
    with _client(args) as c:
        if args.cancel:
            print(json.dumps(c.cancel_job(args.job_id)))
        elif args.watch:
            for job in c.watch_job(args.job_id):
                print(json.dumps(job), flush=True)
        else:
            print(json.dumps(c.get_job(args.job_id)))
    return 0


def _render_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("render options (as `avatar render`)")
    g.add_argument("--emotion", default=None, help="emotion label, e.g. neutral, happy, sad, angry, surprised")
    g.add_argument("--emotion-strength", type=float, default=None, help="0 = none, 1 = typical, up to 1.5")
    g.add_argument("--still", action="store_true", help="fixed head (no pose replay)")
    g.add_argument("--no-blink", action="store_true", help="disable blinks")
    g.add_argument("--blink-rate", type=float, default=None, help="blinks per minute (default: the person's own)")
    g.add_argument("--head-speed", type=float, default=None, help="head-motion replay speed (default 1)")
    g.add_argument("--head-amplitude", type=float, default=None, help="head-motion amplitude, 0..2 (default 1)")
    g.add_argument("--temperature", type=float, default=None, help="motion sampling temperature, 0..2")
    g.add_argument("--seed", type=int, default=0, help="random seed (motion sampling, blinks)")
    g.add_argument("--size", type=int, default=None, help="output frame side in pixels (default: the avatar's)")
    g.add_argument("--format", choices=["jpeg", "png"], default="jpeg", help="frame encoding on the wire")


def register(sub) -> None:
    """Add ``serve`` and ``client`` to the ``avatar`` command."""
    p = sub.add_parser(
        "serve",
        help="run the gRPC renderer service",
        description="Serve avatar.v1.AvatarService (plus gRPC health and reflection) for the avatars "
        "in a store. Every RPC but health needs a bearer token (--tokens-file or "
        "$AVATAR_TOKENS: entries TOKEN=SCOPE[,SCOPE], scopes render/onboard/admin; the file must "
        "be mode 0600 or 0640). Logs are JSON lines; Prometheus metrics on --metrics-port, "
        "on the same host as gRPC.",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="avatar store directory (default: $AVATAR_HOME or the per-user data dir)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="bind address (default 127.0.0.1, this machine only; [::] or 0.0.0.0 = every "
        "interface, which needs --tls-cert/--tls-key or logs a warning)",
    )
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (default 9464; -1 = off)")
    p.add_argument("--tokens-file", type=Path, default=None, help="API tokens, lines TOKEN=SCOPE[,SCOPE]")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS, with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--device", default=None, help="torch device for rendering (default: cuda if available)")
    p.add_argument(
        "--web",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the browser console (avatars, onboarding, render, live WebRTC) on this HTTP "
        "port of the same host, same tokens (0 = any free port; needs the [web] extra)",
    )
    p.add_argument(
        "--jobs",
        choices=["local", "ray"],
        default=None,
        help="where onboarding stages run: local worker processes (default) or Ray tasks on a cluster "
        "(needs the [ray] extra and the store on storage every node shares; docs/SCALE.md)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster for --jobs ray (default: $RAY_ADDRESS, else a local Ray instance)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="JSON file of ServerConfig limits (max_audio_s, max_streams, idle_timeout_s, cache_size, "
        "max_jobs, max_message_mb, max_video_mb, ...)",
    )
    p.set_defaults(func=_serve)

    c = sub.add_parser(
        "client", help="call a running avatar service", description="Command-line client of avatar.v1.AvatarService."
    )
    c.add_argument(
        "--target",
        default=os.environ.get("AVATAR_TARGET", "localhost:50051"),
        help="server host:port (default $AVATAR_TARGET or localhost:50051)",
    )
    c.add_argument("--token", default=None, help="API token (default $AVATAR_TOKEN)")
    c.add_argument("--tls-ca", default=None, help="PEM CA/cert to trust; enables TLS")
    cs = c.add_subparsers(dest="client_command", metavar="ACTION", required=True)

    p = cs.add_parser("list", help="list avatars")
    p.set_defaults(func=_cmd_list)
    p = cs.add_parser("get", help="one avatar's metadata")
    p.add_argument("name")
    p.set_defaults(func=_cmd_get)

    p = cs.add_parser("render", help="render an audio file to an MP4 (Render RPC)")
    p.add_argument("--avatar", required=True)
    p.add_argument("--audio", required=True, type=Path, help="driving speech (any audio file)")
    p.add_argument("--out", required=True, type=Path, help="output .mp4")
    _render_flags(p)
    p.set_defaults(func=_cmd_render)

    p = cs.add_parser("stream", help="stream an audio file in chunks to an MP4 (StreamRender RPC)")
    p.add_argument("--avatar", required=True)
    p.add_argument("--audio", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--chunk-ms", type=float, default=100.0, help="audio chunk length, ms (default 100)")
    p.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="send audio as fast as possible and ask for unpaced frames",
    )
    p.add_argument("--emotion-at", type=float, default=None, help="switch emotion at this audio time (s)")
    p.add_argument("--switch-emotion", default="happy", help="emotion to switch to at --emotion-at")
    g = p.add_argument_group("latency (StreamConfig.block / nerf_right; the lookahead is printed)")
    g.add_argument(
        "--block",
        type=int,
        default=None,
        metavar="FRAMES",
        help="frames per motion block, 1..64 (default 8); smaller = lower lookahead, more compute per frame",
    )
    g.add_argument(
        "--nerf-right",
        type=int,
        default=None,
        metavar="FRAMES",
        help="frames of NeRF look-ahead, 0..W//2 (default W//2 = 2, the full centred window)",
    )
    g.add_argument(
        "--low-latency",
        action="store_true",
        help="shorthand for --block 2 --nerf-right 1 (0.28 s lookahead with an avatar trained --future 4)",
    )
    _render_flags(p)
    p.set_defaults(func=_cmd_stream)

    p = cs.add_parser("onboard", help="upload a video and start onboarding")
    p.add_argument("video", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--preset", default="cpu-small", help="cpu-smoke, cpu-small or gpu-full")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--wait", action="store_true", help="watch the job until it finishes")
    p.set_defaults(func=_cmd_onboard)

    p = cs.add_parser("job", help="show, watch or cancel an onboarding job")
    p.add_argument("job_id")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--cancel", action="store_true")
    p.set_defaults(func=_cmd_job)

    p = cs.add_parser("jobs", help="list the onboarding jobs of the server's store (past ones too), newest first")
    p.add_argument("--avatar", default=None, help="only this avatar's jobs")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default 100)")
    p.set_defaults(func=_cmd_jobs)
