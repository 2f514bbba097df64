"""Onboarding jobs: each runs :func:`avatar.pipeline.onboard.onboard` in its own worker process.

Worker processes are started with the ``spawn`` method (no forked torch/gRPC state), so rendering
in the server process stays responsive while a job trains. At most ``max_running`` jobs run at
once; the rest wait in FIFO order (at most ``max_queued``). Cancelling sets the job's
``multiprocessing.Event`` (``onboard`` checks it between steps); a worker still alive
``cancel_grace_s`` later is terminated. Job records live in memory: they are lost on restart
(finished avatars are in the store regardless).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import queue
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

from avatar.errors import ResourceLimit

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


@dataclasses.dataclass
class JobRecord:
    """State of one onboarding job (times are unix seconds, 0 = not yet)."""

    job_id: str
    avatar: str
    preset: str
    overwrite: bool
    video: Path
    state: str = QUEUED
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    error_code: str = ""
    error: str = ""
    created_unix: float = 0.0
    started_unix: float = 0.0
    finished_unix: float = 0.0
    queue_position: int = 0
    version: int = 0


def _worker(job_id: str, video: str, name: str, store_root: str, preset: str, overwrite: bool,
            events, cancel) -> None:
    """Worker-process entry point: run one onboarding and report through ``events``."""
    try:
        from avatar.errors import AvatarError
        from avatar.pipeline.onboard import onboard
        from avatar.store import AvatarStore

        def progress(stage: str, fraction: float, message: str) -> None:
            events.put((job_id, "progress", stage, float(fraction), str(message)))

        path = onboard(Path(video), name, store=AvatarStore(store_root), preset=preset, overwrite=overwrite,
                       progress=progress, cancel=cancel)
        events.put((job_id, "done", str(path)))
    except AvatarError as e:
        events.put((job_id, "error", e.grpc_code, str(e)))
    except BaseException as e:  # report, never hang the job
        events.put((job_id, "error", "INTERNAL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))


class JobManager:
    """Queue and run onboarding jobs in spawned worker processes.

    Args:
        store_root: the avatar store directory the workers write to.
        max_running: jobs that may run at once (N).
        max_queued: jobs that may wait; more -> :class:`ResourceLimit`.
        cancel_grace_s: seconds a cancelled worker may take to stop before it is terminated.
        on_change: called with a JobRecord copy after every state change (metrics).
        on_success: called with the avatar name after a job succeeded (cache invalidation).
    """

    def __init__(self, store_root: str | Path, max_running: int = 1, max_queued: int = 16,
                 cancel_grace_s: float = 10.0, on_change: Callable[[JobRecord], None] | None = None,
                 on_success: Callable[[str], None] | None = None):
        self.store_root = str(store_root)
        self.max_running = max_running
        self.max_queued = max_queued
        self.cancel_grace_s = cancel_grace_s
        self._on_change = on_change
        self._on_success = on_success
        self._ctx = mp.get_context("spawn")
        self._events = self._ctx.Queue()
        self._jobs: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._procs: dict[str, tuple] = {}  # job_id -> (process, cancel event, cancel deadline or None)
        self._cond = threading.Condition()
        self._closed = False
        self._monitor = threading.Thread(target=self._run, name="onboard-jobs", daemon=True)
        self._monitor.start()

    # ---- public API -------------------------------------------------------------------------
    def submit(self, video: Path, name: str, preset: str, overwrite: bool) -> JobRecord:
        """Queue a job for ``video`` (a file this manager now owns and deletes when done).

        Raises:
            ResourceLimit: the queue is full.
        """
        with self._cond:
            if len(self._queue) >= self.max_queued:
                raise ResourceLimit(f"{len(self._queue)} onboarding jobs are already queued; retry after one finishes")
            job = JobRecord(uuid.uuid4().hex[:16], name, preset, overwrite, Path(video), created_unix=time.time())
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
            self._changed(job)
            self._start_queued()
            return dataclasses.replace(job)

    def get(self, job_id: str) -> JobRecord | None:
        """A copy of the job's record, or None if unknown."""
        with self._cond:
            job = self._jobs.get(job_id)
            return dataclasses.replace(job) if job else None

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        with self._cond:
            out = dict.fromkeys((QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED), 0)
            for job in self._jobs.values():
                out[job.state] += 1
            return out

    def wait_change(self, job_id: str, version: int, timeout: float) -> JobRecord | None:
        """Block until the job's version differs from ``version`` (or ``timeout`` s); returns a copy."""
        with self._cond:
            self._cond.wait_for(lambda: self._jobs[job_id].version != version or self._closed, timeout)
            return dataclasses.replace(self._jobs[job_id])

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued (immediately) or running (cooperatively, then terminate) job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return dataclasses.replace(job) if job else None
            if job.state == QUEUED:
                self._queue.remove(job_id)
                self._finish(job, CANCELLED, "", "cancelled before it started")
            else:
                proc, event, _ = self._procs[job_id]
                event.set()
                self._procs[job_id] = (proc, event, time.monotonic() + self.cancel_grace_s)
                job.message = "cancelling"
                self._changed(job)
            return dataclasses.replace(job)

    def close(self) -> None:
        """Cancel everything, terminate workers and stop the monitor thread."""
        with self._cond:
            self._closed = True
            for job_id in list(self._queue):
                self._finish(self._jobs[job_id], CANCELLED, "", "server shutting down")
            self._queue.clear()
            procs = list(self._procs.items())
        for job_id, (proc, event, _) in procs:
            event.set()
            proc.join(2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
        self._monitor.join(5.0)

    # ---- internals (hold self._cond) ----------------------------------------------------------
    def _changed(self, job: JobRecord) -> None:
        job.version += 1
        for pos, jid in enumerate(self._queue, 1):
            self._jobs[jid].queue_position = pos
        self._cond.notify_all()
        if self._on_change:
            self._on_change(dataclasses.replace(job))

    def _finish(self, job: JobRecord, state: str, code: str, message: str) -> None:
        job.state, job.finished_unix, job.queue_position = state, time.time(), 0
        if state == FAILED:
            job.error_code, job.error = code, message
        else:
            job.message = message
        job.video.unlink(missing_ok=True)
        self._changed(job)

    def _start_queued(self) -> None:
        while self._queue and len(self._procs) < self.max_running and not self._closed:
            job = self._jobs[self._queue.pop(0)]
            event = self._ctx.Event()
            proc = self._ctx.Process(
                target=_worker, name=f"onboard-{job.job_id}", daemon=True,
                args=(job.job_id, str(job.video), job.avatar, self.store_root, job.preset, job.overwrite,
                      self._events, event))
            proc.start()
            self._procs[job.job_id] = (proc, event, None)
            job.state, job.started_unix, job.queue_position, job.message = RUNNING, time.time(), 0, "starting worker"
            log.info("onboarding job %s started (avatar %s, pid %s)", job.job_id, job.avatar, proc.pid)
            self._changed(job)

    def _handle(self, event: tuple) -> None:
        job_id, kind, *rest = event
        job = self._jobs.get(job_id)
        if job is None or job.state in FINISHED:
            return
        cancelled = job_id in self._procs and self._procs[job_id][1].is_set()
        if kind == "progress":
            job.stage, job.progress, job.message = rest[0], rest[1], rest[2]
            self._changed(job)
        elif kind == "done":
            self._finish(job, SUCCEEDED, "", f"avatar written to {rest[0]}")
            if self._on_success:
                self._on_success(job.avatar)
        elif cancelled:
            self._finish(job, CANCELLED, "", "cancelled")
        else:
            self._finish(job, FAILED, rest[0], rest[1])

    def _run(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                event = None
            except (EOFError, OSError):
                return
            with self._cond:
                if event is not None:
                    self._handle(event)
                self._reap()
                self._start_queued()
                if self._closed and not self._procs:
                    return

    def _reap(self) -> None:
        now = time.monotonic()
        for job_id, (proc, event, deadline) in list(self._procs.items()):
            if proc.is_alive():
                if deadline is not None and now > deadline:
                    log.warning("onboarding job %s did not stop %.0f s after cancel; terminating", job_id, self.cancel_grace_s)
                    proc.terminate()
                continue
            # drain any events the worker sent just before exiting
            while True:
                try:
                    self._handle(self._events.get(timeout=0.3))
                except queue.Empty:
                    break
            del self._procs[job_id]
            job = self._jobs[job_id]
            if job.state not in FINISHED:
                if event.is_set():
                    self._finish(job, CANCELLED, "", "cancelled")
                else:
                    self._finish(job, FAILED, "INTERNAL", f"onboarding worker exited with code {proc.exitcode}; see server log")
