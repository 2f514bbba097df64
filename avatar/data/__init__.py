"""The dataset format shared by every stage (see :mod:`avatar.data.dataset`)."""

from avatar.data.dataset import Dataset  # noqa: F401
