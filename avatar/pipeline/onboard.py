"""Onboard a speaker: video -> preprocess -> postnet -> head NeRF -> torso NeRF -> avatar bundle.

Each stage writes into the store's work directory ``work/<name>/`` and is resumable: a stage whose
output is complete is skipped; the NeRF trainer resumes from its last checkpoint. The bundle is
assembled in a temp dir and renamed into ``avatars/<name>`` at the end (atomic), then the work
directory is removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from filelock import FileLock, Timeout

from avatar.atomic import atomic_dir, check_free_space, clean_stale_temps
from avatar.config import to_dict
from avatar.errors import (
    AvatarError,
    AvatarNotFound,
    Cancelled,
    InvalidInput,
    InvalidMedia,
    OutputExists,
    ResourceLimit,
)
from avatar.store import AvatarStore, validate_name
from avatar.pipeline.stages import PRESETS, STAGE_DEPS, STAGES, OnboardPreset, run_stage  # noqa: F401  (re-exported)
from avatar.store.bundle import BUNDLE_SCHEMA, file_digests, sha256_file

log = logging.getLogger(__name__)

Progress = Callable[[str, float, str], None]


def _stage_progress(progress: Progress | None, stage: str):
    def cb(fraction: float, message: str = "") -> None:
        if progress is not None:
            progress(stage, float(fraction), message)

    return cb


def onboard(
    video: str | Path,
    name: str,
    store: AvatarStore | None = None,
    preset: str = "cpu-small",
    generator: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel=None,
    audio: str | Path | None = None,
    keep_work: bool = False,
    ray_address: str | None = None,
    seed: int = 0,
    bars: bool = True,
) -> Path:
    """Onboard the speaker in ``video`` as avatar ``name``.

    Args:
        video: talking video of one person (3-5 min ideal; any container/rate).
        name: avatar name (validated: no path traversal).
        store: the avatar store (default ``$AVATAR_HOME``).
        preset: ``cpu-smoke`` (tests), ``cpu-small`` (CPU demo), ``gpu-full`` (the product).
        generator: shared generator bundle; default ``store/shared/generator``.
        overwrite: replace an existing avatar of that name.
        progress: ``callback(stage, fraction 0..1, message)``.
        cancel: an Event; when set, onboarding stops at the next step (resumable).
        audio: separate audio track for a silent video.
        keep_work: keep ``work/<name>`` (dataset, checkpoints) after success.
        ray_address: run the training stages as Ray tasks (:mod:`avatar.pipeline.distributed`) on the
            cluster at this address ("" = ``$RAY_ADDRESS`` or a local Ray instance); None (default)
            runs them here and never imports Ray. The work dir must be on storage every node shares.
        seed: the training stages' seed (:func:`~avatar.pipeline.stages.run_stage`); work of another
            seed is not resumed.
        bars: tqdm bars of the local stages when there is no ``progress`` callback (False: ``-q``).
    Returns:
        the bundle directory.
    Raises:
        InvalidInput (bad name/preset), OutputExists (exists, no overwrite), AvatarNotFound (no
        generator), InvalidMedia & co. (bad video; the work dir is removed, since a rerun cannot
        resume a bad input), Cancelled, TrainingDiverged, ResourceLimit (the same name is being
        onboarded by another process, or too little disk space for the work dir).
    """
    from avatar.motion import load_generator

    validate_name(name)
    if preset not in PRESETS:
        raise InvalidInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    store = store or AvatarStore()
    video = Path(video)
    if not video.is_file():
        raise InvalidMedia(f"video {video} not found; give the path of the speaker's talking video")
    if store.exists(name) and not overwrite:
        raise OutputExists(
            f"avatar {name!r} already exists in {store.root}; pass --overwrite to replace it or pick another name"
        )
    gen_dir = Path(generator) if generator else store.generator_dir
    if not (gen_dir / "config.json").is_file():
        raise AvatarNotFound(
            f"no shared generator at {gen_dir}; train one with "
            f"`avatar train-generator CORPUS_DIR --out {store.generator_dir}` (e.g. on ../shared/data/corpus) "
            "or pass --generator DIR"
        )
    gen = load_generator(gen_dir, device="cpu")

    work = store.work_dir(name)
    work.parent.mkdir(parents=True, exist_ok=True)
    # one onboarding per name at a time (an OS lock: released even when the holder is killed)
    lock = FileLock(str(work.parent / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ResourceLimit(
            f"avatar {name!r} is already being onboarded by another process; wait for it to finish or cancel it"
        ) from None
    try:
        out = _onboard_locked(
            video,
            name,
            store,
            p,
            preset,
            gen,
            gen_dir,
            work,
            overwrite,
            progress,
            cancel,
            audio,
            keep_work,
            ray_address,
            seed,
            bars,
        )
    except InvalidInput:
        # the input itself is bad (no face, no audio, too short...): rerunning cannot resume it
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        lock.release()
    return out


def estimate_work_bytes(video: Path, size: int) -> int:
    """Disk space onboarding ``video`` at ``size`` px needs in the work dir (bytes, an upper estimate):
    the memory-mapped frames and masks of the dataset (25 fps) twice over plus 256 MB for models."""
    from avatar.media import probe

    try:
        info = probe(video)
        duration = info.video_duration_s or info.duration_s or 0.0
    except AvatarError:
        return 0  # preprocess reports the bad video with a clear message
    frames = int(duration * 25) + 1
    return 2 * frames * size * size * 4 + (256 << 20)


def _onboard_locked(
    video: Path,
    name: str,
    store: AvatarStore,
    p: OnboardPreset,
    preset: str,
    gen,
    gen_dir: Path,
    work: Path,
    overwrite: bool,
    progress,
    cancel,
    audio,
    keep_work: bool,
    ray_address: str | None = None,
    seed: int = 0,
    bars: bool = True,
) -> Path:
    """The body of :func:`onboard`, run while holding the per-name lock."""
    clean_stale_temps(store.avatars_dir, name)
    sha = sha256_file(video)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state and (
        state.get("sha256") != sha
        or state.get("preset") != preset
        or state.get("generator") != str(gen_dir)
        or state.get("seed", 0) != seed
    ):
        log.info("work dir %s is for another input/preset/seed; starting over", work)
        shutil.rmtree(work)
        state = {}
    work.mkdir(parents=True, exist_ok=True)
    state.update({"sha256": sha, "preset": preset, "generator": str(gen_dir), "video": str(video), "seed": seed})
    state.setdefault("times", {})

    def save_state():
        state_path.write_text(json.dumps(state, indent=2))

    def check_cancel():
        if cancel is not None and cancel.is_set():
            save_state()
            raise Cancelled(f"onboarding of {name!r} cancelled; rerun the same command to resume")

    save_state()
    clean_stale_temps(work, "dataset")  # .dataset.tmp-* of a killed preprocess
    if "preprocess" not in state.get("done", []):
        check_free_space(work, estimate_work_bytes(video, p.size), f"onboarding {name!r}")
    dataset_dir, motion_dir, postnet_dir, nerf_dir = (work / d for d in ("dataset", "generator", "postnet", "nerf"))

    def run(stage: str) -> None:
        check_cancel()
        k = f"stage {list(STAGE_DEPS).index(stage) + 1} of {len(STAGE_DEPS)}"
        if stage in state.get("done", []):
            log.info("onboarding %r: %s, %s: done in an earlier run (resumed)", name, k, stage)
            _stage_progress(progress, stage)(1.0, "done (resumed)")
            return
        log.info("onboarding %r: %s, %s (preset %s)", name, k, stage, preset)  # announced before its bars
        t0 = time.perf_counter()
        run_stage(
            stage,
            work,
            video,
            preset,
            gen_dir,
            audio=audio,
            cb=_stage_progress(progress, stage),
            cancel=cancel,
            show_bars=bars and progress is None,
            gen=gen,
            seed=seed,
        )
        _stage_progress(progress, stage)(1.0, "done")
        state["times"][stage] = round(time.perf_counter() - t0, 1)
        log.info("onboarding %r: %s done in %.1f s", name, stage, state["times"][stage])
        state.setdefault("done", []).append(stage)
        save_state()

    if ray_address is not None:  # the stages as Ray tasks; this process only schedules and records them
        from avatar.pipeline.distributed import run_stages

        run_stages(
            ray_address,
            name=name,
            work=work,
            video=video,
            preset=preset,
            gen_dir=gen_dir,
            audio=audio,
            state=state,
            save_state=save_state,
            progress=progress,
            cancel=cancel,
            seed=seed,
        )
    else:
        for stage in STAGE_DEPS:
            run(stage)
    check_cancel()
    t0 = time.perf_counter()
    out = _assemble(
        store, name, dataset_dir, motion_dir, postnet_dir, nerf_dir, p, preset, video, sha, state, overwrite
    )
    state["times"]["bundle"] = round(time.perf_counter() - t0, 1)
    _stage_progress(progress, "bundle")(1.0, str(out))
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _assemble(
    store: AvatarStore,
    name: str,
    dataset_dir: Path,
    gen_dir: Path,
    postnet_dir: Path,
    nerf_dir: Path,
    p: OnboardPreset,
    preset: str,
    video: Path,
    sha: str,
    state: dict,
    overwrite: bool,
) -> Path:
    from avatar.data import Dataset
    from avatar.face.landmarks import eye_aspect_ratio
    from avatar.pipeline.controls import BlinkModel

    ds = Dataset(dataset_dir)
    train = ds.train_range
    lm3d_train = np.asarray(ds.lm3d[train.start : train.stop])
    step = max(1, len(lm3d_train) // p.lle_ref)
    blink = BlinkModel.fit(lm3d_train, eye_aspect_ratio(lm3d_train))
    metrics = {}
    for sub in (
        gen_dir / "metrics.json",
        postnet_dir / "metrics.json",
        nerf_dir / "head" / "metrics.json",
        nerf_dir / "torso" / "metrics.json",
    ):
        if sub.is_file():
            prefix = sub.parent.name
            for k, v in json.loads(sub.read_text()).items():
                if isinstance(v, (int, float)):
                    metrics[f"{prefix}.{k}"] = float(v)
    target = store.avatar_dir(name)
    with atomic_dir(target, overwrite=overwrite) as tmp:
        shutil.copytree(gen_dir, tmp / "generator", ignore=shutil.ignore_patterns("cache", "runs", "*.tmp*"))
        shutil.copytree(postnet_dir, tmp / "postnet", ignore=shutil.ignore_patterns("runs", "checkpoints"))
        (tmp / "nerf").mkdir()
        for part in ("head", "torso"):
            shutil.copytree(
                nerf_dir / part, tmp / "nerf" / part, ignore=shutil.ignore_patterns("runs", "checkpoints", "ckpt*")
            )
        save_file(
            {
                "pose_track": np.ascontiguousarray(ds.pose[train.start : train.stop], dtype=np.float32),
                "lm3d_mean": np.ascontiguousarray(ds.lm3d_mean, dtype=np.float32),
                "lm3d_ref": np.ascontiguousarray(lm3d_train[::step], dtype=np.float32),
                "background": np.ascontiguousarray(ds.background, dtype=np.uint8),
            },
            str(tmp / "track.safetensors"),
        )
        (tmp / "blink.json").write_text(json.dumps(blink.to_dict()))
        manifest = {
            "schema": BUNDLE_SCHEMA,
            "name": name,
            "size": ds.size,
            "fps": ds.fps,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "preset": preset,
            "preset_config": to_dict(p),
            "seed": state.get("seed", 0),
            "source": {
                "path": str(video),
                "sha256": sha,
                **{k: v for k, v in ds.manifest["source"].items() if k not in ("path", "sha256")},
            },
            "dataset": {
                k: ds.manifest[k]
                for k in ("n_frames", "crop_box", "intrinsics", "head_scale", "split", "features")
                if k in ds.manifest
            },
            "tools": ds.manifest.get("tools", {}),
            "metrics": metrics,
            "stage_seconds": state.get("times", {}),
            # sha256 + size of every other file, verified when the bundle is loaded
            "files": file_digests(tmp),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target
