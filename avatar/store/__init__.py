"""The avatar store: named avatar bundles and the shared models on local disk.

Layout under the store root (``$AVATAR_HOME``, default: the per-user data directory)::

    avatars/<name>/        one avatar bundle (see :mod:`avatar.store.bundle`), written atomically
    shared/generator/      the default shared audio2motion generator bundle (``avatar train-generator``)
    shared/emotion/        the default shared emotion model (``avatar train-emotion``), optional
    work/<name>/           resumable onboarding state (dataset, checkpoints); removed after success
"""

from avatar.store.store import AvatarStore, default_store_root, validate_name  # noqa: F401
