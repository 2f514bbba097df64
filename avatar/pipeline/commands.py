"""CLI: ``avatar onboard | render | list | show | delete | demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from avatar.store import AvatarStore


def _store(args) -> AvatarStore:
    return AvatarStore(args.store)


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="avatar store directory (default: $AVATAR_HOME or the per-user data dir)",
    )


def _progress_printer():
    """One overall progress line: stage, fraction, message, elapsed."""
    from avatar.pipeline.onboard import STAGES

    t0 = time.perf_counter()

    def cb(stage: str, fraction: float, message: str) -> None:
        i = STAGES.index(stage) + 1 if stage in STAGES else 0
        el = time.perf_counter() - t0
        print(
            f"\r[{i}/{len(STAGES)} {stage}] {100 * fraction:5.1f}% {message[:60]:<60} {el / 60:5.1f} min",
            end="",
            file=sys.stderr,
            flush=True,
        )
        if fraction >= 1.0:
            print(file=sys.stderr)

    return cb


def cmd_onboard(args) -> int:
    from avatar.pipeline.onboard import onboard

    t0 = time.perf_counter()
    out = onboard(
        args.video,
        args.name,
        store=_store(args),
        preset=args.preset,
        generator=args.generator,
        overwrite=args.overwrite,
        audio=args.audio,
        keep_work=args.keep_work,
        ray_address=getattr(args, "ray", None),
        seed=args.seed,
        bars=not getattr(args, "quiet", False),
    )
    if getattr(args, "json", False):
        info = _store(args).info(args.name)
        print(
            json.dumps(
                {
                    "name": args.name,
                    "path": str(out),
                    "preset": info["preset"],
                    "size": info["size"],
                    "metrics": info["metrics"],
                    "wall_s": round(time.perf_counter() - t0, 3),
                }
            )
        )
    else:
        print(f"avatar {args.name!r} ready: {out}")
    return 0


def options_from_args(args):
    """RenderOptions from the shared render flags (also used by ``avatar client``)."""
    from avatar.pipeline.render import RenderOptions

    opts = RenderOptions(
        emotion=args.emotion,
        emotion_strength=args.emotion_strength,
        emotion_video=str(args.emotion_video) if args.emotion_video else None,
        emotion_neutral_video=str(args.emotion_neutral_video) if getattr(args, "emotion_neutral_video", None) else None,
        still=args.still,
        blink=not args.no_blink,
        blink_rate=args.blink_rate,
        temperature=args.temperature,
        seed=args.seed,
        size=args.size,
        head_speed=args.head_speed,
        head_amplitude=args.head_amplitude,
        lle_blend=args.lle,
    )
    opts.validate()
    return opts


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The render controls shared by ``avatar render`` and ``avatar client render|stream``."""
    from avatar.pipeline.render import EMOTIONS

    g = p.add_argument_group("expression and motion controls")
    g.add_argument("--emotion", default="neutral", help=f"emotion label: {', '.join(EMOTIONS)} (default neutral)")
    g.add_argument("--emotion-strength", type=float, default=1.0, help="0 = none, 1 = typical, up to 1.5")
    g.add_argument(
        "--emotion-video", type=Path, default=None, help="reference video whose expression is transferred (EAMM-style)"
    )
    g.add_argument(
        "--emotion-neutral-video",
        type=Path,
        default=None,
        help="a neutral clip of the --emotion-video person (the expression is measured against it)",
    )
    g.add_argument("--still", action="store_true", help="fixed head (no pose replay)")
    g.add_argument("--no-blink", action="store_true", help="disable blinks")
    g.add_argument("--blink-rate", type=float, default=None, help="blinks per minute (default: the person's own)")
    g.add_argument("--head-speed", type=float, default=1.0, help="head-motion replay speed (default 1)")
    g.add_argument("--head-amplitude", type=float, default=1.0, help="head-motion amplitude, 0..2 (default 1)")
    g.add_argument("--temperature", type=float, default=1.0, help="motion sampling temperature, 0..2")
    g.add_argument("--seed", type=int, default=0, help="random seed (motion sampling, blinks)")
    g.add_argument("--size", type=int, default=None, help="output frame side in pixels (default: the avatar's)")
    g.add_argument(
        "--lle", type=float, default=0.0, help="LLE projection blend onto the person's landmarks (GeneFace++), 0..1"
    )


def _mp4_estimate_bytes(audio: Path, size: int | None, store: AvatarStore, name: str) -> int:
    """Upper estimate of the MP4 ``avatar render`` writes (bytes): 1/10 of the raw RGB frames + 1 MB,
    at ``size`` or else the avatar's own size."""
    from avatar.errors import AvatarError
    from avatar.media import probe

    try:
        seconds = probe(audio).duration_s or 0.0
        side = size or int(store.manifest(name)["size"])
    except AvatarError:
        return 0  # the render reports the bad audio or avatar
    return int(seconds * 25 * side * side * 3 / 10) + (1 << 20)


def cmd_render(args) -> int:
    from avatar.api import load
    from avatar.atomic import check_output_file

    opts = options_from_args(args)
    # the output path and the disk space are checked before the avatar is loaded and anything rendered
    check_output_file(args.out, _mp4_estimate_bytes(args.audio, args.size, _store(args), args.avatar))
    t0 = time.perf_counter()
    av = load(args.avatar, store=_store(args))
    res = av.render_to_mp4(args.audio, args.out, opts, progress=not getattr(args, "quiet", False))
    if getattr(args, "json", False):
        print(json.dumps({"avatar": args.avatar, **res, "wall_s": round(time.perf_counter() - t0, 3)}))
        return 0
    print(f"wrote {res['path']}: {res['frames']} frames, {res['seconds']:.2f} s, {res['render_fps']:.1f} frames/s")
    return 0


def cmd_list(args) -> int:
    st = _store(args)
    rows = st.list(include_broken=True)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no avatars in {st.root}; create one with `avatar onboard VIDEO --name NAME`")
        return 0
    for r in rows:
        if "broken" in r:
            print(f"{r['name']:<24} BROKEN  {r['broken']}")
        else:
            print(f"{r['name']:<24} {r['size']:>4}px  {r['preset']:<10} {r['created']}")
    return 0


def cmd_show(args) -> int:
    # the manifest is JSON already: --json is accepted for the same flags on list/show/render/onboard
    print(json.dumps(_store(args).manifest(args.name), indent=2))
    return 0


def cmd_delete(args) -> int:
    _store(args).delete(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_demo(args) -> int:
    from avatar_recipes.demo import run_demo

    return run_demo(Path(args.data), Path(args.out), preset=args.preset, progress=not getattr(args, "quiet", False))


def register(sub) -> None:
    p = sub.add_parser(
        "onboard",
        help="train an avatar from a talking video of one person",
        description="Preprocess -> postnet -> head NeRF -> torso NeRF -> avatar bundle in the store. "
        "Resumable: rerun the same command after a crash or Ctrl-C.",
    )
    p.add_argument("video", type=Path, help="talking video of one person (3-5 minutes ideal)")
    p.add_argument("--name", required=True, help="avatar name (letters, digits, _ . -)")
    p.add_argument(
        "--preset", default="cpu-small", choices=["cpu-smoke", "cpu-small", "gpu-full"], help="training preset"
    )
    p.add_argument(
        "--generator", type=Path, default=None, help="shared generator bundle (default: the store's shared/generator)"
    )
    p.add_argument("--audio", type=Path, default=None, help="separate audio file for a silent video")
    p.add_argument("--overwrite", action="store_true", help="replace an existing avatar of that name")
    p.add_argument("--keep-work", action="store_true", help="keep the dataset and checkpoints after success")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); runs are deterministic per seed")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (name, path, preset, size, metrics, wall_s) instead of the text line",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the stages as Ray tasks (needs the [ray] extra and a store on storage every node "
        "shares): on the cluster at ADDRESS, else $RAY_ADDRESS, else a local Ray instance "
        "(docs/SCALE.md)",
    )
    _add_store(p)
    p.set_defaults(func=cmd_onboard)

    p = sub.add_parser(
        "render",
        help="render a talking video of an avatar from speech audio",
        description="Audio (any format/rate, or the audio track of a video) -> H.264 MP4 with the audio muxed in.",
    )
    p.add_argument("--avatar", required=True, help="avatar name (see `avatar list`)")
    p.add_argument("--audio", required=True, type=Path, help="driving speech: wav, mp3, m4a, or a video with audio")
    p.add_argument("--out", required=True, type=Path, help="output .mp4")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (path, frames, seconds, render_fps, wall_s) instead of the text line",
    )
    add_render_options(p)
    _add_store(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("list", help="list avatars in the store")
    p.add_argument(
        "--json", action="store_true", help="print the rows as a JSON list (broken ones with a 'broken' reason)"
    )
    _add_store(p)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="print an avatar's manifest")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the manifest as one JSON object (the default output too)")
    _add_store(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("delete", help="delete an avatar")
    p.add_argument("name")
    _add_store(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("demo", help="the README demo: train the generator, onboard, render (CPU preset)")
    p.add_argument("--data", default="../shared/data", help="real test media root")
    p.add_argument("--out", default="demo_out", help="output directory (store + videos)")
    p.add_argument("--preset", default="cpu-small", choices=["cpu-smoke", "cpu-small"], help="onboarding preset")
    p.set_defaults(func=cmd_demo)
