"""One exception hierarchy for every user-facing error.

Every message says what went wrong *and what to do about it*. The CLI prints ``str(err)`` and exits
with ``err.exit_code``; the gRPC service maps each class to a status code via ``grpc_code``.
"""

from __future__ import annotations


class AvatarError(Exception):
    """Base class of all user-facing errors. ``grpc_code`` names a ``grpc.StatusCode`` member."""

    exit_code = 1
    grpc_code = "INTERNAL"


class InvalidInput(AvatarError):
    """A bad argument, option or value supplied by the user."""

    exit_code = 2
    grpc_code = "INVALID_ARGUMENT"


class InvalidMedia(InvalidInput):
    """A file is missing, not a media file, truncated/corrupt, or lacks a needed stream."""


class NoAudio(InvalidMedia):
    """The input has no audio stream (and none was supplied separately), or the audio is empty."""


class ClipTooShort(InvalidMedia):
    """The clip is too short for the requested stage."""


class NoFaceDetected(InvalidMedia):
    """No face (or no face over a long stretch) was found where one is required."""


class FeatureMismatch(InvalidInput):
    """Audio features of one kind were given to a model trained on another kind."""


class OutputExists(AvatarError):
    """The output path already exists and ``--overwrite`` was not given."""

    exit_code = 3
    grpc_code = "ALREADY_EXISTS"


class AvatarNotFound(AvatarError):
    """The named avatar (or shared model bundle) does not exist in the store."""

    exit_code = 4
    grpc_code = "NOT_FOUND"


class BundleCorrupt(AvatarError):
    """A dataset, model bundle or avatar bundle is incomplete, corrupt or of an unknown schema."""

    exit_code = 5
    grpc_code = "FAILED_PRECONDITION"


class TrainingDiverged(AvatarError):
    """Training produced NaNs or a diverging loss; the last good checkpoint is kept."""

    exit_code = 6
    grpc_code = "INTERNAL"


class ResourceLimit(AvatarError):
    """A request exceeds a configured size / duration / concurrency limit."""

    exit_code = 7
    grpc_code = "RESOURCE_EXHAUSTED"


class Cancelled(AvatarError):
    """A long job (onboarding, a training stage) was cancelled; rerun the same command to resume from
    the last finished step. Raised by the stages themselves, so it lives here, below them."""

    grpc_code = "CANCELLED"
    exit_code = 130
