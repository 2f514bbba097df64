"""Onboarding jobs: each runs :func:`avatar.pipeline.onboard.onboard` in its own worker process.

Worker processes are started with the ``spawn`` method (no forked torch/gRPC state), so rendering
in the server process stays responsive while a job trains. At most ``max_running`` jobs run at
once; the rest wait in FIFO order (at most ``max_queued``). Cancelling sets the job's
``multiprocessing.Event`` (``onboard`` checks it between steps); a worker still alive
``cancel_grace_s`` later is terminated.

Workers never outlive the server: each asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``; workers are started from the manager's monitor thread, which lives
until every worker has been reaped) and also polls its parent pid, so a ``kill -9`` of the server
cannot leave an untracked worker training on. ``onboard`` holds a per-name file lock, so a
resubmission can never race a dying worker.

Job records are journalled to ``STORE/jobs/<job_id>.json``. At start-up the manager reconciles the
journal: jobs a dead server left QUEUED/RUNNING are marked FAILED ("resubmit to resume": the work
dir is kept, so onboarding the same video resumes), and records older than ``keep_days`` are removed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
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


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Make the calling process exit when ``parent_pid`` dies (called first thing in a worker).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes, then a check that the parent did not
    die before that call. Everywhere: a daemon thread that polls ``os.getppid()`` every ``poll_s``
    seconds and calls ``os._exit`` once the process has been re-parented.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except OSError:
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker(job_id: str, video: str, name: str, store_root: str, preset: str, overwrite: bool,
            events, cancel, parent_pid: int | None = None) -> None:
    """Worker-process entry point: run one onboarding and report through ``events``."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
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
    except OSError as e:  # disk full during a checkpoint, permissions...: one line, work dir kept to resume
        from avatar.atomic import is_disk_full

        log.error("onboarding job %s failed", job_id, exc_info=True)
        if is_disk_full(e):
            events.put((job_id, "error", "RESOURCE_EXHAUSTED", f"{e.strerror}: free disk space on the server, then "
                                                               "submit the same video again to resume"))
        else:
            events.put((job_id, "error", "INTERNAL", f"{type(e).__name__}: {e.strerror or e}; see the server log"))
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
        keep_days: journalled records of finished jobs older than this are removed at start-up.
    """

    def __init__(self, store_root: str | Path, max_running: int = 1, max_queued: int = 16,
                 cancel_grace_s: float = 10.0, on_change: Callable[[JobRecord], None] | None = None,
                 on_success: Callable[[str], None] | None = None, keep_days: float = 7.0):
        self.store_root = str(store_root)
        self.journal = Path(store_root) / "jobs"
        self.keep_days = keep_days
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
        self._saved: dict[str, str] = {}
        self._reconcile()
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
            if any(j.avatar == name and j.state not in FINISHED for j in self._jobs.values()):
                raise ResourceLimit(f"avatar {name!r} is already being onboarded; wait for that job or cancel it")
            job = JobRecord(uuid.uuid4().hex[:16], name, preset, overwrite, Path(video), created_unix=time.time())
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
            self._changed(job)
            # workers are started by the monitor thread only (their parent-death signal is tied to it)
            self._events.put((None, "wake"))
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

    # ---- journal ------------------------------------------------------------------------------
    def _save(self, job: JobRecord) -> None:
        """Write the job's record to the journal (atomically; failures are logged, not raised)."""
        try:
            self.journal.mkdir(parents=True, exist_ok=True)
            rec = {**dataclasses.asdict(job), "video": "", "server_pid": os.getpid()}
            tmp = self.journal / f".{job.job_id}.json.tmp"
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, self.journal / f"{job.job_id}.json")
        except OSError as e:
            log.warning("cannot journal onboarding job %s: %s", job.job_id, e)

    def _reconcile(self) -> None:
        """Load the journal: mark jobs of dead servers FAILED, drop old records and temp files."""
        from avatar.atomic import pid_alive

        if not self.journal.is_dir():
            return
        now = time.time()
        fields = {f.name for f in dataclasses.fields(JobRecord)}
        for path in self.journal.iterdir():
            try:
                if path.name.startswith("."):
                    path.unlink()
                    continue
                rec = json.loads(path.read_text())
                owner = int(rec.get("server_pid", 0))
                if owner != os.getpid() and pid_alive(owner) and rec.get("state") not in FINISHED:
                    continue  # another live server on this store owns it
                job = JobRecord(**{k: v for k, v in rec.items() if k in fields and k != "video"}, video=Path(""))
            except (OSError, ValueError, TypeError) as e:
                log.warning("removing unreadable job record %s (%s)", path.name, e)
                path.unlink(missing_ok=True)
                continue
            if job.state not in FINISHED:
                log.warning("onboarding job %s (avatar %s) was interrupted by a server stop; marking it FAILED",
                            job.job_id, job.avatar)
                job.state, job.finished_unix, job.queue_position = FAILED, now, 0
                job.error_code = "ABORTED"
                job.error = ("the server stopped while this job was queued or running; submit the same video again "
                             "to resume from the last finished step")
                self._save(job)
            elif now - (job.finished_unix or job.created_unix) > self.keep_days * 86400:
                path.unlink(missing_ok=True)
                continue
            self._jobs[job.job_id] = job

    # ---- internals (hold self._cond) ----------------------------------------------------------
    def _changed(self, job: JobRecord) -> None:
        job.version += 1
        for pos, jid in enumerate(self._queue, 1):
            self._jobs[jid].queue_position = pos
        if self._saved.get(job.job_id) != job.state:  # every state change, not every progress tick
            self._saved[job.job_id] = job.state
            self._save(job)
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
                      self._events, event, os.getpid()))
            proc.start()
            self._procs[job.job_id] = (proc, event, None)
            job.state, job.started_unix, job.queue_position, job.message = RUNNING, time.time(), 0, "starting worker"
            log.info("onboarding job %s started (avatar %s, pid %s)", job.job_id, job.avatar, proc.pid)
            self._changed(job)

    def _handle(self, event: tuple) -> None:
        job_id, kind, *rest = event
        if job_id is None:  # a wake-up from submit
            return
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
