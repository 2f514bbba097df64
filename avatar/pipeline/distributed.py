"""Onboarding stages as Ray tasks: ``avatar onboard VIDEO --name N --ray [ADDRESS]`` and
``avatar serve --jobs ray [--ray-address A]`` (docs/SCALE.md).

Only imported when Ray was asked for (the ``ray`` extra); the default path never imports Ray.

- **What runs where**: the calling process (the CLI, or one job worker of the server) is the Ray
  *driver*: it holds the per-name onboarding lock, validates the input, submits one task per training
  stage, records finished stages in ``work/<name>/state.json`` and assembles the bundle. Each task
  runs :func:`avatar.pipeline.onboard.run_stage`, which reads the previous stages' files in the work
  directory and writes its own; tasks pass nothing but their run time (seconds) to each other. So
  the work directory (the store) must be on storage every node mounts at the same path.
- **Graph**: preprocess -> motion -> postnet, and preprocess -> head NeRF -> torso NeRF, the two
  chains side by side. A stage already in ``state.json``'s ``done`` list is not submitted again.
- **Resources** (:func:`stage_resources`): preprocess, motion and postnet ask for CPUs; head and
  torso ask for one GPU each where the cluster has GPUs (motion/postnet a fraction of one for the
  ``gpu-full`` preset), else one CPU. ``AVATAR_RAY_RESOURCES`` (JSON ``{stage: {num_cpus, num_gpus,
  memory, resources}}``) overrides them.
- **Failures**: a task whose worker process or node dies is retried (``max_retries``, default 3);
  the retry resumes from the stage files (the NeRF trainer from its last checkpoint). Errors the stage
  raises itself (bad video, diverged training) are not retried: the driver re-raises the original
  ``AvatarError``.
- **Progress and cancel** go through one small actor per onboarding (:class:`_Control`): tasks report
  ``(stage, fraction, message)`` and poll the cancel flag between steps; the driver forwards progress
  to its ``progress`` callback (a server job's WatchJob) and sets the flag when its ``cancel`` event is
  set, then force-cancels tasks still running after ``cancel_grace_s``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import ray

from avatar.errors import AvatarError, Cancelled, InvalidInput
from avatar.pipeline.stages import PRESETS, STAGE_DEPS, run_stage

log = logging.getLogger(__name__)

ENV_RESOURCES = "AVATAR_RAY_RESOURCES"
DEFAULT_RETRIES = 3


class StageFailed(AvatarError):
    """A stage's Ray worker (or node) died more often than its retries allow."""

    grpc_code = "ABORTED"
    exit_code = 75


def connect(address: str | None = None) -> str:
    """Join the Ray cluster at ``address`` ("" / None: ``$RAY_ADDRESS``, else start a local instance)
    unless this process already has; returns the cluster's GCS address (for other processes)."""
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray.get_runtime_context().gcs_address


def stage_resources(stage: str, preset: str, cluster_gpus: float) -> dict:
    """Ray resource request of one stage's task (see the module docstring)."""
    if stage in ("head", "torso") and cluster_gpus > 0:
        req = {"num_cpus": 1, "num_gpus": 1}
    elif stage in ("motion", "postnet") and cluster_gpus > 0 and preset == "gpu-full":
        req = {"num_cpus": 1, "num_gpus": 0.5}
    else:
        req = {"num_cpus": 1}
    raw = os.environ.get(ENV_RESOURCES)
    if raw:
        try:
            override = json.loads(raw).get(stage, {})
        except (ValueError, AttributeError):
            raise InvalidInput(
                f'${ENV_RESOURCES} must be JSON like {{"preprocess": {{"num_cpus": 4}}, "head": {{"num_gpus": 1}}}}'
            ) from None
        req.update({k: v for k, v in override.items() if k in ("num_cpus", "num_gpus", "memory", "resources")})
    return req


@ray.remote(num_cpus=0, max_restarts=-1)
class _Control:
    """Per-onboarding progress mailbox and cancel flag, shared by the driver and the stage tasks."""

    def __init__(self):
        self.cancelled = False
        self.events: list[tuple] = []
        self.attempts: dict[str, list] = {}

    def cancel(self) -> None:
        self.cancelled = True

    def is_cancelled(self) -> bool:
        return self.cancelled

    def started(self, stage: str, pid: int, host: str) -> int:
        self.attempts.setdefault(stage, []).append([pid, host])
        n = len(self.attempts[stage])
        self.events.append((stage, 0.0, f"running on {host} (pid {pid}, attempt {n})"))
        return n

    def report(self, stage: str, fraction: float, message: str) -> None:
        self.events.append((stage, fraction, message))

    def drain(self) -> list[tuple]:
        out, self.events = self.events, []
        return out

    def get_attempts(self) -> dict[str, list]:
        return self.attempts


class _RemoteCancel:
    """An Event-like ``is_set()`` backed by the control actor (asked at most once a second)."""

    def __init__(self, control, every_s: float = 1.0):
        self.control, self.every_s, self._last, self._set = control, every_s, 0.0, False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._last >= self.every_s:
            self._last = now
            try:
                self._set = bool(ray.get(self.control.is_cancelled.remote(), timeout=10))
            except Exception:  # the actor is restarting: not cancelled as far as we know
                pass
        return self._set


@ray.remote(max_retries=DEFAULT_RETRIES, retry_exceptions=False)
def _stage_task(
    stage: str,
    work: str,
    video: str,
    preset: str,
    gen_dir: str,
    audio: str | None,
    seed: int,
    control,
    num_cpus: float,
    *_upstream,
) -> float:
    """One stage on a Ray worker; ``_upstream`` are the finished upstream stages' results (ordering only)."""
    if not ray.get_gpu_ids():  # a CPU stage on a GPU node never touches the GPUs the NeRF tasks hold
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from avatar.runtime import configure_threads

    configure_threads(max(1, int(num_cpus)))
    ray.get(control.started.remote(stage, os.getpid(), socket.gethostname()))
    last = [0.0]

    def cb(fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - last[0] >= 0.5:
            last[0] = now
            control.report.remote(stage, float(fraction), str(message))

    t0 = time.perf_counter()
    run_stage(
        stage,
        Path(work),
        Path(video),
        preset,
        Path(gen_dir),
        audio=audio,
        cb=cb,
        cancel=_RemoteCancel(control),
        seed=seed,
    )
    return round(time.perf_counter() - t0, 1)


def run_stages(
    address: str | None,
    *,
    name: str,
    work: Path,
    video: Path,
    preset: str,
    gen_dir: Path,
    audio,
    state: dict,
    save_state,
    progress=None,
    cancel=None,
    max_retries: int = DEFAULT_RETRIES,
    cancel_grace_s: float = 10.0,
    seed: int = 0,
) -> dict[str, int]:
    """Run the onboarding stages not yet in ``state["done"]`` as Ray tasks (called by
    :func:`avatar.pipeline.onboard.onboard` under its per-name lock). Records each finished stage in
    ``state`` (``done``, ``times``, ``attempts``) and calls ``save_state()`` at once. ``seed``: the
    training stages' seed (:func:`~avatar.pipeline.stages.run_stage`).

    Returns:
        {stage: number of task attempts} of the stages run here.
    Raises:
        Cancelled: ``cancel`` was set. StageFailed: a worker died more often than ``max_retries``.
        The stage's own AvatarError (InvalidMedia, TrainingDiverged, ...) unchanged.
    """
    if preset not in PRESETS:
        raise InvalidInput(f"unknown preset {preset!r}")
    connect(address)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    control = _Control.remote()
    done = set(state.get("done", []))
    refs: dict[str, ray.ObjectRef] = {}
    pending: dict[ray.ObjectRef, str] = {}

    def emit(stage: str, fraction: float, message: str) -> None:
        if progress is not None:
            progress(stage, float(fraction), message)
        elif fraction >= 1.0 or message.startswith("running on"):
            log.info("onboarding %s: %s %3.0f%% %s", name, stage, 100 * fraction, message)

    for stage, deps in STAGE_DEPS.items():
        if stage in done:
            emit(stage, 1.0, "done (resumed)")
            continue
        req = stage_resources(stage, preset, gpus)
        ref = _stage_task.options(**req, max_retries=max_retries, name=f"onboard:{name}:{stage}").remote(
            stage,
            str(work),
            str(video),
            preset,
            str(gen_dir),
            str(audio) if audio else None,
            seed,
            control,
            req.get("num_cpus", 1),
            *[refs[d] for d in deps if d in refs],
        )
        refs[stage] = ref
        pending[ref] = stage
        log.info("onboarding %s: submitted %s to Ray (%s)", name, stage, req)

    cancel_deadline = None
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            for ev in ray.get(control.drain.remote()):
                emit(*ev)
            if cancel is not None and cancel.is_set() and cancel_deadline is None:
                control.cancel.remote()
                cancel_deadline = time.monotonic() + cancel_grace_s
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                raise Cancelled(f"onboarding of {name!r} cancelled; rerun the same command to resume")
            for ref in ready:
                stage = pending.pop(ref)
                try:
                    seconds = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, AvatarError):
                        raise cause from None
                    raise
                except (
                    ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError,
                    ray.exceptions.OutOfMemoryError,
                    ray.exceptions.TaskCancelledError,
                ) as e:
                    if cancel_deadline is not None:
                        raise Cancelled(f"onboarding of {name!r} cancelled; rerun the same command to resume") from None
                    raise StageFailed(
                        f"stage {stage} of {name!r} failed on the Ray cluster after {max_retries} "
                        f"retries ({type(e).__name__}); rerun to resume from the last finished "
                        "stage"
                    ) from None
                for ev in ray.get(control.drain.remote()):
                    emit(*ev)
                emit(stage, 1.0, "done")
                state.setdefault("done", []).append(stage)
                state.setdefault("times", {})[stage] = seconds
                save_state()
    except BaseException:
        # stop the other chain: cooperatively first, then by force
        control.cancel.remote()
        still = list(pending)
        if still:
            ray.wait(still, num_returns=len(still), timeout=min(cancel_grace_s, 10.0))
            for ref in still:
                ray.cancel(ref, force=True)
        raise
    finally:
        try:
            attempts = {k: len(v) for k, v in ray.get(control.get_attempts.remote(), timeout=10).items()}
            state.setdefault("attempts", {}).update(attempts)
            save_state()
        except Exception:  # best effort: attempts are diagnostics
            attempts = {}
        ray.kill(control)
    return attempts
