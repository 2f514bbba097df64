"""Avatar store on disk: list / info / delete / paths, with name validation."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import platformdirs

from avatar.errors import AvatarNotFound, BundleCorrupt, InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BUNDLE_SCHEMA = "avatar.bundle/1"


def default_store_root() -> Path:
    """``$AVATAR_HOME`` if set, else the per-user data dir (e.g. ``~/.local/share/avatar``)."""
    env = os.environ.get("AVATAR_HOME")
    return Path(env) if env else Path(platformdirs.user_data_dir("avatar", appauthor=False))


def validate_name(name: str) -> str:
    """Check an avatar name: 1-64 chars of letters, digits, ``_ . -``, starting alphanumeric.

    Raises:
        InvalidInput: on anything else (path separators, ``..``, empty, too long).
    """
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
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
            raise InvalidInput(f"avatar store {self.root} is not a directory; set AVATAR_HOME or --store to a directory")
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
        return sorted(p.name for p in self.avatars_dir.iterdir() if (p / "manifest.json").is_file() and NAME_RE.match(p.name))

    def manifest(self, name: str) -> dict:
        """The bundle manifest of ``name``.

        Raises:
            AvatarNotFound: no such avatar (message lists the available ones).
            BundleCorrupt: unreadable manifest or unknown schema.
        """
        path = self.avatar_dir(name) / "manifest.json"
        if not path.is_file():
            have = ", ".join(self.names()) or "none"
            raise AvatarNotFound(
                f"no avatar named {name!r} in store {self.root} (available: {have}); "
                f"create it with `avatar onboard VIDEO --name {name}`"
            )
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleCorrupt(f"avatar {name!r}: cannot read {path} ({e}); re-onboard it with --overwrite") from e
        if manifest.get("schema") != BUNDLE_SCHEMA:
            raise BundleCorrupt(f"avatar {name!r}: unknown bundle schema {manifest.get('schema')!r}; re-onboard it with --overwrite")
        return manifest

    def info(self, name: str) -> dict:
        """Summary for listings and the gRPC ``GetAvatar``: name, size, fps, created, metrics."""
        m = self.manifest(name)
        return {
            "name": name,
            "size": int(m["size"]),
            "fps": int(m["fps"]),
            "created": m.get("created", ""),
            "metrics": {k: float(v) for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float))},
            "source_sha256": m.get("source", {}).get("sha256", ""),
            "preset": m.get("preset", ""),
        }

    def list(self) -> list[dict]:
        """Info dicts of every valid avatar; corrupt ones are skipped (shown by ``avatar show``)."""
        out = []
        for name in self.names():
            try:
                out.append(self.info(name))
            except BundleCorrupt:
                continue
        return out

    def delete(self, name: str) -> None:
        """Remove an avatar bundle and its onboarding work dir.

        Raises:
            AvatarNotFound: no such avatar.
        """
        path = self.avatar_dir(name)
        if not path.exists() and not self.work_dir(name).exists():
            raise AvatarNotFound(f"no avatar named {name!r} in store {self.root}; `avatar list` shows the available ones")
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.work_dir(name), ignore_errors=True)
