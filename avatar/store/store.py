"""Avatar store on disk: list / info / delete / paths, with name validation."""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import time
from pathlib import Path

import platformdirs

from avatar.errors import AvatarNotFound, BundleCorrupt, InvalidInput
from avatar.store.bundle import BUNDLE_SCHEMA, read_manifest, validate_bundle  # noqa: F401

log = logging.getLogger(__name__)

#: an avatar name; always used with ``fullmatch`` (``$`` would accept a trailing newline)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_store_root() -> Path:
    """``$AVATAR_HOME`` if set, else the per-user data dir (e.g. ``~/.local/share/avatar``)."""
    env = os.environ.get("AVATAR_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("avatar", appauthor=False))


def validate_name(name: str) -> str:
    """Check an avatar name: 1-64 chars of letters, digits, ``_ . -``, starting alphanumeric.

    Raises:
        InvalidInput: on anything else (path separators, ``..``, empty, too long).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"invalid avatar name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


class AvatarStore:
    """A directory of avatar bundles plus the shared models.

    Raises:
        InvalidInput: the root exists but is not a readable, writable directory.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_store_root()
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInput(
                f"avatar store {self.root} is not a directory; set AVATAR_HOME or --store to a directory"
            )
        if self.root.exists() and not os.access(self.root, os.R_OK | os.X_OK):
            raise InvalidInput(f"avatar store {self.root} is not readable; fix its permissions or choose another store")

    # paths ---------------------------------------------------------------------------------
    @property
    def avatars_dir(self) -> Path:
        return self.root / "avatars"

    def avatar_dir(self, name: str) -> Path:
        return self.avatars_dir / validate_name(name)

    def work_dir(self, name: str) -> Path:
        return self.root / "work" / validate_name(name)

    @property
    def generator_dir(self) -> Path:
        """Default shared generator bundle location."""
        return self.root / "shared" / "generator"

    @property
    def emotion_dir(self) -> Path:
        """Default shared emotion model location."""
        return self.root / "shared" / "emotion"

    # queries -------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return (self.avatar_dir(name) / "manifest.json").is_file()

    def names(self) -> list[str]:
        if not self.avatars_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.avatars_dir.iterdir()
            if NAME_RE.fullmatch(p.name) and ".." not in p.name and (p / "manifest.json").is_file()
        )

    def manifest(self, name: str, verify_hashes: bool = False) -> dict:
        """The validated bundle manifest of ``name`` (see :func:`avatar.store.bundle.validate_bundle`).

        Args:
            name: avatar name. verify_hashes: also verify every file's SHA-256 (reads the weights).
        Raises:
            InvalidInput: bad name.
            AvatarNotFound: no such avatar (message lists the available ones).
            BundleCorrupt: missing/unreadable manifest, unknown schema, missing keys or files,
                size or checksum mismatch.
        """
        path = self.avatar_dir(name) / "manifest.json"
        if not path.is_file():
            have = ", ".join(self.names()) or "none"
            raise AvatarNotFound(
                f"no avatar named {name!r} in store {self.root} (available: {have}); pass --store DIR (or set "
                f"AVATAR_HOME) if it was made in another store, e.g. `make demo` uses demo_out/store; or create it "
                f"with `avatar onboard VIDEO --name {name}`"
            )
        return validate_bundle(self.avatar_dir(name), name, verify_hashes=verify_hashes)

    def info(self, name: str) -> dict:
        """Summary for listings and the gRPC ``GetAvatar``: name, size, fps, created, metrics, ...

        Raises:
            AvatarNotFound, BundleCorrupt: as :meth:`manifest`.
        """
        m = self.manifest(name)
        source = m.get("source") if isinstance(m.get("source"), dict) else {}
        return {
            "name": name,
            "size": int(m["size"]),
            "fps": int(m["fps"]),
            "created": m["created"],
            "metrics": {
                k: float(v)
                for k, v in (m.get("metrics") or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            "source_sha256": str(source.get("sha256", "")),
            "preset": str(m.get("preset", "")),
        }

    def list(self, include_broken: bool = False) -> list[dict]:
        """Info dicts of the avatars, by name.

        Args:
            include_broken: also return broken bundles, as ``{"name", "broken": reason}`` (for
                ``avatar list``); by default they are skipped (and logged), so one broken bundle
                never breaks the listing for everyone.
        """
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except BundleCorrupt as e:
                log.warning("avatar %s is broken: %s", name, e)
                if include_broken:
                    out.append({"name": name, "broken": str(e)})
        return out

    def clean_stale(self, work_max_age_days: float = 7.0) -> builtins.list[Path]:  # `list` is a method here
        """Remove leftovers of killed writers and abandoned onboardings (run at server start-up).

        Removes, where the writing process is no longer running: half-assembled bundles
        (``avatars/.NAME.tmp-<pid>-*``, ``.NAME.old-<pid>-*``) and half-written datasets
        (``work/NAME/.dataset.tmp-<pid>-*``); and work directories untouched for
        ``work_max_age_days`` whose onboarding lock is free. Returns the removed paths; never raises.
        """
        from filelock import FileLock, Timeout

        from avatar.atomic import clean_stale_temps

        removed: list[Path] = []
        if self.avatars_dir.is_dir():
            names = {
                m.group(1) for p in self.avatars_dir.iterdir() if (m := re.fullmatch(r"\.(.+)\.(?:tmp|old)-.*", p.name))
            }
            for name in names:
                removed += clean_stale_temps(self.avatars_dir, name)
        work_root = self.root / "work"
        if not work_root.is_dir():
            return removed
        now = time.time()
        for work in work_root.iterdir():
            if not work.is_dir() or not NAME_RE.fullmatch(work.name):
                continue
            lock = FileLock(str(work_root / f".{work.name}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # an onboarding of this name is running
            try:
                removed += clean_stale_temps(work, "dataset")
                try:
                    newest = max((p.stat().st_mtime for p in work.rglob("*")), default=work.stat().st_mtime)
                except OSError:
                    continue
                if now - newest > work_max_age_days * 86400:
                    log.info("removing abandoned onboarding work dir %s", work)
                    shutil.rmtree(work, ignore_errors=True)
                    removed.append(work)
            finally:
                lock.release()
        return removed

    def delete(self, name: str) -> None:
        """Remove an avatar bundle and its onboarding work dir.

        Raises:
            AvatarNotFound: no such avatar.
        """
        path = self.avatar_dir(name)
        if not path.exists() and not self.work_dir(name).exists():
            raise AvatarNotFound(
                f"no avatar named {name!r} in store {self.root}; `avatar list` shows the available ones"
            )
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.work_dir(name), ignore_errors=True)
