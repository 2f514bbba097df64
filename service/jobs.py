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

Jobs persist in a SQLite table inside the store (``STORE/jobs/jobs.sqlite3``, :class:`JobTable`,
stdlib ``sqlite3``), shared by every server on the store: ``GetJob`` / ``ListJobs`` see past jobs
after a restart and the jobs of other servers. The uploaded video of a job is kept in
``STORE/jobs/inputs/`` until the job finishes. At start-up the manager reconciles the table: a job a
dead server left QUEUED/RUNNING is claimed (atomically, so two servers starting at once never both
take it) and queued again when its video is still there (``onboard`` resumes it from the last
finished stage in ``work/<name>``), else marked FAILED with the reason; finished records older than
``keep_days`` are removed. A server is dead when it ran on this host and its pid is gone, or (another
host) when it has not refreshed its jobs' heartbeat for ``stale_s``. ``CancelJob`` of another
server's job sets a flag that its owner polls.

With ``backend="ray"`` each worker process is a Ray driver: ``onboard(..., ray_address=...)`` runs
the training stages as Ray tasks on the cluster (:mod:`avatar.pipeline.distributed`); queueing,
progress, cancel and persistence stay the same. Ray is only imported with that backend.
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
import shutil
import signal
import socket
import sqlite3
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
    backend: str = "local"
    owner: str = ""  # "host:pid" of the server running it


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


def _worker(
    job_id: str,
    video: str,
    name: str,
    store_root: str,
    preset: str,
    overwrite: bool,
    events,
    cancel,
    parent_pid: int | None = None,
    ray_address: str | None = None,
) -> None:
    """Worker-process entry point: run one onboarding and report through ``events``."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    try:
        from avatar.errors import AvatarError
        from avatar.pipeline.onboard import onboard
        from avatar.store import AvatarStore

        def progress(stage: str, fraction: float, message: str) -> None:
            events.put((job_id, "progress", stage, float(fraction), str(message)))

        path = onboard(
            Path(video),
            name,
            store=AvatarStore(store_root),
            preset=preset,
            overwrite=overwrite,
            progress=progress,
            cancel=cancel,
            ray_address=ray_address,
        )
        events.put((job_id, "done", str(path)))
    except AvatarError as e:
        events.put((job_id, "error", e.grpc_code, str(e)))
    except OSError as e:  # disk full during a checkpoint, permissions...: one line, work dir kept to resume
        from avatar.atomic import is_disk_full

        log.error("onboarding job %s failed", job_id, exc_info=True)
        if is_disk_full(e):
            events.put(
                (
                    job_id,
                    "error",
                    "RESOURCE_EXHAUSTED",
                    f"{e.strerror}: free disk space on the server, then submit the same video again to resume",
                )
            )
        else:
            events.put((job_id, "error", "INTERNAL", f"{type(e).__name__}: {e.strerror or e}; see the server log"))
    except BaseException as e:  # report, never hang the job
        events.put((job_id, "error", "INTERNAL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))


#: JobRecord fields stored in the table (queue_position and version live in memory only)
_COLUMNS = (
    "job_id",
    "avatar",
    "preset",
    "overwrite",
    "video",
    "state",
    "stage",
    "progress",
    "message",
    "error_code",
    "error",
    "created_unix",
    "started_unix",
    "finished_unix",
    "backend",
    "owner",
)


def this_owner() -> str:
    """``host:pid`` of this process, the owner id of the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str, heartbeat_unix: float, stale_s: float) -> bool:
    """Whether the server ``owner`` (``host:pid``) still runs: by pid on this host, else by heartbeat age."""
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname():
        from avatar.atomic import pid_alive

        return pid.isdigit() and pid_alive(int(pid))
    return time.time() - heartbeat_unix < stale_s


class JobTable:
    """The onboarding job table, a SQLite database inside the store (``STORE/jobs/jobs.sqlite3``).

    One connection per manager, serialised by a lock; SQLite's file locking serialises the servers
    that share the store (the default rollback journal, not WAL, so it also works on a network file
    system with working POSIX locks). A store that cannot hold the database (read-only) gets an
    in-memory table and a warning: jobs then live as long as the server. Write errors are logged,
    never raised (a job must not fail because its record could not be saved).
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
            self._init()
        except (OSError, sqlite3.Error) as e:
            log.warning("cannot open the job table %s (%s); job records are kept in memory only", path, e)
            self.path = None
            self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            self._init()

    def _init(self) -> None:
        self._db.execute("""CREATE TABLE IF NOT EXISTS jobs (
            job_id TEXT PRIMARY KEY, avatar TEXT NOT NULL, preset TEXT, overwrite INTEGER, video TEXT, state TEXT,
            stage TEXT, progress REAL, message TEXT, error_code TEXT, error TEXT, created_unix REAL,
            started_unix REAL, finished_unix REAL, backend TEXT, owner TEXT, heartbeat_unix REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0)""")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_unix)")

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _record(row: tuple) -> JobRecord:
        rec = {k: ("" if v is None else v) for k, v in zip(_COLUMNS, row)}
        for k in ("progress", "created_unix", "started_unix", "finished_unix"):
            rec[k] = float(rec[k] or 0.0)
        rec["overwrite"], rec["video"] = bool(rec["overwrite"]), Path(rec["video"])
        return JobRecord(**rec)

    def put(self, job: JobRecord) -> None:
        """Insert or update the job's row (never clears a pending cancel request); refreshes its heartbeat."""
        values = [getattr(job, c) for c in _COLUMNS]
        values[_COLUMNS.index("overwrite")] = int(job.overwrite)
        values[_COLUMNS.index("video")] = str(job.video) if str(job.video) not in ("", ".") else ""
        cols = ", ".join(_COLUMNS)
        update = ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS[1:])
        try:
            self._run(
                f"INSERT INTO jobs ({cols}, heartbeat_unix) VALUES ({', '.join('?' * (len(_COLUMNS) + 1))}) "
                f"ON CONFLICT(job_id) DO UPDATE SET {update}, heartbeat_unix=excluded.heartbeat_unix",
                (*values, time.time()),
            )
        except sqlite3.Error as e:
            log.warning("cannot save onboarding job %s: %s", job.job_id, e)

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._run(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id=?", (job_id,))
        return self._record(rows[0]) if rows else None

    def list(self, avatar: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest ``limit`` jobs (of ``avatar`` if given), newest first."""
        where, args = ("WHERE avatar=?", (avatar,)) if avatar else ("", ())
        rows = self._run(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY created_unix DESC LIMIT ?", (*args, int(limit))
        )
        return [self._record(r) for r in rows]

    def unfinished(self) -> list[tuple[JobRecord, float]]:
        """(record, heartbeat) of every QUEUED/RUNNING job, any owner."""
        rows = self._run(
            f"SELECT {', '.join(_COLUMNS)}, heartbeat_unix FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)
        )
        return [(self._record(r[:-1]), float(r[-1] or 0.0)) for r in rows]

    def claim(self, job_id: str, old_owner: str, new_owner: str) -> bool:
        """Take over an orphaned job; False when another server took it first."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET owner=?, heartbeat_unix=? WHERE job_id=? AND owner=? AND state IN (?, ?)",
                (new_owner, time.time(), job_id, old_owner, QUEUED, RUNNING),
            )
            return cur.rowcount == 1

    def heartbeat(self, owner: str) -> None:
        try:
            self._run(
                "UPDATE jobs SET heartbeat_unix=? WHERE owner=? AND state IN (?, ?)",
                (time.time(), owner, QUEUED, RUNNING),
            )
        except sqlite3.Error as e:
            log.warning("cannot refresh the job heartbeat: %s", e)

    def request_cancel(self, job_id: str) -> None:
        self._run("UPDATE jobs SET cancel_requested=1 WHERE job_id=?", (job_id,))

    def cancel_requests(self, owner: str) -> list[str]:
        try:
            return [
                r[0]
                for r in self._run(
                    "SELECT job_id FROM jobs WHERE owner=? AND cancel_requested=1 AND state IN (?, ?)",
                    (owner, QUEUED, RUNNING),
                )
            ]
        except sqlite3.Error:
            return []

    def remove_finished_before(self, t: float) -> list[JobRecord]:
        """Delete finished records that ended before unix time ``t``; returns them."""
        old = [
            self._record(r)
            for r in self._run(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state IN (?, ?, ?) AND "
                "COALESCE(NULLIF(finished_unix, 0), created_unix) < ?",
                (*FINISHED, t),
            )
        ]
        for job in old:
            self._run("DELETE FROM jobs WHERE job_id=?", (job.job_id,))
        return old

    def close(self) -> None:
        with self._lock:
            self._db.close()


class JobManager:
    """Queue and run onboarding jobs in spawned worker processes; records persist in :class:`JobTable`.

    Args:
        store_root: the avatar store directory the workers write to.
        max_running: jobs that may run at once (N).
        max_queued: jobs that may wait; more -> :class:`ResourceLimit`.
        cancel_grace_s: seconds a cancelled worker may take to stop before it is terminated.
        on_change: called with a JobRecord copy after every state change (metrics).
        on_success: called with the avatar name after a job succeeded (cache invalidation).
        keep_days: records of finished jobs older than this are removed at start-up.
        backend: ``local`` (stages in the worker process) or ``ray`` (the worker drives Ray tasks).
        ray_address: the Ray cluster for ``backend="ray"`` (None: ``$RAY_ADDRESS``, else this process
            starts a local Ray instance that the workers join).
        stale_s: a server on another host whose jobs' heartbeat is older than this is taken as dead.
    """

    HEARTBEAT_S = 10.0

    def __init__(
        self,
        store_root: str | Path,
        max_running: int = 1,
        max_queued: int = 16,
        cancel_grace_s: float = 10.0,
        on_change: Callable[[JobRecord], None] | None = None,
        on_success: Callable[[str], None] | None = None,
        keep_days: float = 7.0,
        backend: str = "local",
        ray_address: str | None = None,
        stale_s: float = 60.0,
    ):
        if backend not in ("local", "ray"):
            raise ValueError(f"unknown jobs backend {backend!r}; use local or ray")
        self.store_root = str(store_root)
        self.journal = Path(store_root) / "jobs"
        self.inputs = self.journal / "inputs"
        self.keep_days = keep_days
        self.max_running = max_running
        self.max_queued = max_queued
        self.cancel_grace_s = cancel_grace_s
        self.backend = backend
        self.stale_s = stale_s
        self.owner = this_owner()
        self.ray_address = None
        if backend == "ray":  # this process joins (or starts) the cluster; workers connect to its address
            from avatar.pipeline.distributed import connect

            self.ray_address = connect(ray_address)
            log.info("onboarding jobs run as Ray tasks on the cluster at %s", self.ray_address)
        self._on_change = on_change
        self._on_success = on_success
        self._ctx = mp.get_context("spawn")
        self._events = self._ctx.Queue()
        self._jobs: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._procs: dict[str, tuple] = {}  # job_id -> (process, cancel event, cancel deadline or None)
        self._cond = threading.Condition()
        self._closed = False
        self._saved: dict[str, tuple[str, float]] = {}  # job_id -> (state, monotonic time) of the last save
        self._seen: dict[str, tuple] = {}  # other servers' jobs: what wait_change last returned
        self._user_cancelled: set[str] = set()
        self.table = JobTable(self.journal / "jobs.sqlite3")
        self._import_json_journal()
        self._reconcile()
        self._monitor = threading.Thread(target=self._run, name="onboard-jobs", daemon=True)
        self._monitor.start()

    # ---- public API -------------------------------------------------------------------------
    def submit(self, video: Path, name: str, preset: str, overwrite: bool) -> JobRecord:
        """Queue a job for ``video`` (a file this manager now owns: it is moved into the store and
        deleted when the job finishes).

        Raises:
            ResourceLimit: the queue is full, or the avatar is already being onboarded (by a job of
                this or another server on the store, or by another process such as the CLI).
        """
        self._check_one_writer(name)
        with self._cond:
            if len(self._queue) >= self.max_queued:
                raise ResourceLimit(f"{len(self._queue)} onboarding jobs are already queued; retry after one finishes")
            if any(j.avatar == name and j.state not in FINISHED for j in self._jobs.values()):
                raise ResourceLimit(f"avatar {name!r} is already being onboarded; wait for that job or cancel it")
            job_id = uuid.uuid4().hex[:16]
            job = JobRecord(
                job_id,
                name,
                preset,
                overwrite,
                self._keep_input(Path(video), job_id),
                created_unix=time.time(),
                backend=self.backend,
                owner=self.owner,
            )
            self._jobs[job.job_id] = job
            self._queue.append(job.job_id)
            self._changed(job)
            # workers are started by the monitor thread only (their parent-death signal is tied to it)
            self._events.put((None, "wake"))
            return dataclasses.replace(job)

    def get(self, job_id: str) -> JobRecord | None:
        """A copy of the job's record (this server's, or from the table: past jobs, other servers'), or None."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job:
                return dataclasses.replace(job)
        return self.table.get(job_id)

    def list(self, avatar: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest ``limit`` jobs on this store (every server's), newest first; live ones from memory."""
        rows = self.table.list(avatar, limit)
        with self._cond:
            return [dataclasses.replace(self._jobs[r.job_id]) if r.job_id in self._jobs else r for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        with self._cond:
            out = dict.fromkeys((QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED), 0)
            for job in self._jobs.values():
                out[job.state] += 1
            return out

    def wait_change(self, job_id: str, version: int, timeout: float) -> JobRecord | None:
        """Block until the job's version differs from ``version`` (or ``timeout`` s); returns a copy.

        A job of another server (known only from the table) is re-read after ``min(timeout, 1)`` s; its
        version is bumped when anything in its record changed."""
        with self._cond:
            if job_id in self._jobs:
                self._cond.wait_for(lambda: self._jobs[job_id].version != version or self._closed, timeout)
                return dataclasses.replace(self._jobs[job_id])
        time.sleep(min(timeout, 1.0))
        job = self.table.get(job_id)
        if job is not None:
            job.version = (
                version + 1 if (job.state, job.stage, job.progress, job.message) != self._seen.get(job_id) else version
            )
            self._seen[job_id] = (job.state, job.stage, job.progress, job.message)
        return job

    def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued (immediately) or running (cooperatively, then terminate) job; a job of
        another server on the store is flagged in the table and cancelled by its owner within seconds."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                other = self.table.get(job_id)
                if other is not None and other.state not in FINISHED:
                    self.table.request_cancel(job_id)
                    other.message = "cancel requested"
                return other
            if job.state in FINISHED:
                return dataclasses.replace(job)
            self._user_cancelled.add(job_id)
            if job.state == QUEUED:
                self._queue.remove(job_id)
                self._finish(job, CANCELLED, "", "cancelled before it started")
            elif self._procs[job_id][2] is None:  # not already cancelling (keep the first deadline)
                proc, event, _ = self._procs[job_id]
                event.set()
                self._procs[job_id] = (proc, event, time.monotonic() + self.cancel_grace_s)
                job.message = "cancelling"
                self._changed(job)
            return dataclasses.replace(job)

    def close(self) -> None:
        """Stop the workers and the monitor thread. Queued and running jobs stay QUEUED/RUNNING in the
        table with their input kept: the next server on this store resumes them."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            procs = list(self._procs.items())
        for job_id, (proc, event, _) in procs:
            event.set()
            proc.join(2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
        self._monitor.join(5.0)
        self.table.close()

    # ---- persistence ------------------------------------------------------------------------------
    def _keep_input(self, video: Path, job_id: str) -> Path:
        """Move the uploaded video into ``STORE/jobs/inputs/`` so a restarted server can resume the job."""
        try:
            self.inputs.mkdir(parents=True, exist_ok=True)
            kept = self.inputs / f"{job_id}{video.suffix}"
            shutil.move(str(video), kept)
            return kept
        except OSError as e:  # read-only store: the job still runs, it just cannot be resumed by another server
            log.warning("cannot keep the input of job %s in the store (%s); it will not survive a restart", job_id, e)
            return video

    def _check_one_writer(self, name: str) -> None:
        """Refuse a second writer of ``name`` early: a live job of another server, or the per-name lock
        (``work/.NAME.lock``, held by ``onboard`` in any process: the CLI, a worker of any server)."""
        from filelock import FileLock, Timeout

        for job, beat in self.table.unfinished():
            if job.avatar == name and job.owner != self.owner and owner_alive(job.owner, beat, self.stale_s):
                raise ResourceLimit(
                    f"avatar {name!r} is already being onboarded by job {job.job_id} of another "
                    "server on this store; wait for it or cancel it"
                )
        lock_path = Path(self.store_root) / "work" / f".{name}.lock"
        if not lock_path.parent.is_dir():
            return
        lock = FileLock(str(lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ResourceLimit(
                f"avatar {name!r} is already being onboarded by another process on this store "
                "(the CLI or another server); wait for it to finish or cancel it"
            ) from None
        lock.release()

    def _import_json_journal(self) -> None:
        """Move the records of the older JSON journal (``STORE/jobs/*.json``) into the table."""
        if not self.journal.is_dir():
            return
        fields = {f.name for f in dataclasses.fields(JobRecord)}
        for path in self.journal.glob("*.json"):
            try:
                rec = json.loads(path.read_text())
                job = JobRecord(
                    **{k: v for k, v in rec.items() if k in fields and k not in ("video", "owner")},
                    video=Path(""),
                    owner=f"{socket.gethostname()}:{int(rec.get('server_pid', 0))}",
                )
                if self.table.get(job.job_id) is None:
                    self.table.put(job)
            except (OSError, ValueError, TypeError) as e:
                log.warning("removing unreadable job record %s (%s)", path.name, e)
            path.unlink(missing_ok=True)
        for path in self.journal.glob(".*.json.tmp"):
            path.unlink(missing_ok=True)

    def _reconcile(self) -> None:
        """Take over the jobs of dead servers: queue them again where their input is kept (they resume
        from the last finished stage), else mark them FAILED with the reason; drop old records."""
        now = time.time()
        for job, beat in self.table.unfinished():
            # (a job of this very process is an orphan too: an earlier manager here was closed)
            if (job.owner != self.owner and owner_alive(job.owner, beat, self.stale_s)) or not self.table.claim(
                job.job_id, job.owner, self.owner
            ):
                continue  # a live server owns it, or another server claimed it first
            job.owner = self.owner
            if str(job.video) not in ("", ".") and job.video.is_file():
                log.warning(
                    "onboarding job %s (avatar %s) was interrupted by a server stop; resuming it",
                    job.job_id,
                    job.avatar,
                )
                job.state, job.started_unix, job.backend = QUEUED, 0.0, self.backend
                job.message = "resumed after a server restart (from the last finished stage)"
                self._jobs[job.job_id] = job
                self._queue.append(job.job_id)
            else:
                log.warning(
                    "onboarding job %s (avatar %s) was interrupted by a server stop and its video is gone; "
                    "marking it FAILED",
                    job.job_id,
                    job.avatar,
                )
                job.state, job.finished_unix, job.queue_position = FAILED, now, 0
                job.error_code = "ABORTED"
                job.error = (
                    "the server stopped while this job was queued or running and its uploaded video is gone; "
                    "submit the same video again to resume from the last finished step"
                )
                self._jobs[job.job_id] = job
            self.table.put(job)
        for pos, jid in enumerate(self._queue, 1):
            self._jobs[jid].queue_position = pos
        for job in self.table.remove_finished_before(now - self.keep_days * 86400):
            if str(job.video) not in ("", "."):
                job.video.unlink(missing_ok=True)
        if self.inputs.is_dir():  # inputs no live job refers to (a server killed between move and save)
            live = {j.video.name for j, _ in self.table.unfinished()}
            for path in self.inputs.iterdir():
                try:
                    if path.name not in live and now - path.stat().st_mtime > 3600:
                        path.unlink(missing_ok=True)
                except OSError:  # removed meanwhile by another server
                    pass

    # ---- internals (hold self._cond) ----------------------------------------------------------
    def _changed(self, job: JobRecord) -> None:
        job.version += 1
        for pos, jid in enumerate(self._queue, 1):
            self._jobs[jid].queue_position = pos
        last_state, last_t = self._saved.get(job.job_id, ("", 0.0))
        now = time.monotonic()
        if last_state != job.state or now - last_t >= 2.0:  # every state change, progress every 2 s
            self._saved[job.job_id] = (job.state, now)
            self.table.put(job)
        self._cond.notify_all()
        if self._on_change:
            self._on_change(dataclasses.replace(job))

    def _finish(self, job: JobRecord, state: str, code: str, message: str) -> None:
        if self._closed and state != SUCCEEDED and job.job_id not in self._user_cancelled:
            # stopped by the server's shutdown, not by the client: left for the next server to resume
            job.state, job.started_unix, job.queue_position = QUEUED, 0.0, 0
            job.message = "interrupted by a server shutdown; the next server on this store resumes it"
            self._changed(job)
            return
        job.state, job.finished_unix, job.queue_position = state, time.time(), 0
        if state == FAILED:
            job.error_code, job.error = code, message
        else:
            job.message = message
        if str(job.video) not in ("", "."):
            job.video.unlink(missing_ok=True)
        self._changed(job)

    def _start_queued(self) -> None:
        while self._queue and len(self._procs) < self.max_running and not self._closed:
            job = self._jobs[self._queue.pop(0)]
            event = self._ctx.Event()
            proc = self._ctx.Process(
                target=_worker,
                name=f"onboard-{job.job_id}",
                daemon=True,
                args=(
                    job.job_id,
                    str(job.video),
                    job.avatar,
                    self.store_root,
                    job.preset,
                    job.overwrite,
                    self._events,
                    event,
                    os.getpid(),
                    self.ray_address,
                ),
            )
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
        beat = polled = time.monotonic()
        while True:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                event = None
            except (EOFError, OSError):
                return
            now = time.monotonic()
            requests = []
            if now - polled >= 1.0:  # CancelJob of our jobs sent to another server on the store
                polled = now
                requests = self.table.cancel_requests(self.owner)
            if now - beat >= self.HEARTBEAT_S:
                beat = now
                self.table.heartbeat(self.owner)
            for job_id in requests:
                self.cancel(job_id)
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
                    log.warning(
                        "onboarding job %s did not stop %.0f s after cancel; terminating", job_id, self.cancel_grace_s
                    )
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
                    self._finish(
                        job, FAILED, "INTERNAL", f"onboarding worker exited with code {proc.exitcode}; see server log"
                    )
