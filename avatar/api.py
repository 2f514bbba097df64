"""Python API mirroring the CLI: ``avatar.api.load("NAME").render(audio)`` -> frames iterator.

Used by notebooks, the ``avatar render`` command and the gRPC service alike.

Example::

    import avatar.api as api
    av = api.load("acosta")
    for frame in av.render("speech.wav", api.RenderOptions(still=True)):
        ...  # uint8 [S, S, 3] RGB at 25 fps
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from avatar.pipeline.render import RenderOptions, StreamSession, n_frames_for, render_frames, render_to_mp4  # noqa: F401
from avatar.store import AvatarStore

__all__ = ["Avatar", "RenderOptions", "StreamSession", "load"]


class Avatar:
    """A loaded avatar: its models on a device, ready to render.

    Attributes:
        name: avatar name; size: trained frame side (pixels); fps: 25.
    """

    fps = 25

    def __init__(self, name: str, store: AvatarStore, device: str | None = None):
        from avatar.pipeline.bundle import AvatarModels

        store.manifest(name)  # AvatarNotFound / BundleCorrupt with a clear message
        self.name = name
        self.store = store
        self.models = AvatarModels(store.avatar_dir(name), device=device)
        self.size = self.models.size

    def info(self) -> dict:
        """name, size, fps, created (ISO 8601), metrics (dict of floats), ..."""
        return self.store.info(self.name)

    def render(self, audio: str | Path | np.ndarray, options: RenderOptions | None = None) -> Iterator[np.ndarray]:
        """Frames (uint8 [S, S, 3] RGB, 25 fps) for ``audio`` (path of any audio/video file, or a float32
        mono 16 kHz array); ``round(n_samples / 640)`` frames. Lazy: stopping stops the work.

        Raises:
            InvalidInput / NoAudio / InvalidMedia: bad options or audio.
        """
        return render_frames(self.models, audio, options or RenderOptions())

    def render_to_mp4(
        self, audio, out: str | Path, options: RenderOptions | None = None, progress: bool = True
    ) -> dict:
        """Render to an H.264 MP4 with the driving audio; returns path, frames, seconds, render_fps."""
        return render_to_mp4(self.models, audio, out, options, progress=progress)

    def stream(self, options: RenderOptions | None = None) -> StreamSession:
        """A real-time session: ``push`` float32 16 kHz chunks, ``finish`` at the end."""
        return StreamSession(self.models, options or RenderOptions())


def load(name: str, store: str | Path | AvatarStore | None = None, device: str | None = None) -> Avatar:
    """Load avatar ``name`` from ``store`` (path or :class:`AvatarStore`; default ``$AVATAR_HOME``).

    Raises:
        AvatarNotFound: no such avatar. BundleCorrupt: incomplete bundle. InvalidInput: bad name.
    """
    st = store if isinstance(store, AvatarStore) else AvatarStore(store)
    return Avatar(name, st, device=device)
