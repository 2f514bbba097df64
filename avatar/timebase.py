"""The time base every stage shares (docs/ARCHITECTURE.md "Data contracts"):
video at 25 fps, audio 16 kHz mono float32, audio features at 50 Hz (hop 320 samples), so one video
frame covers exactly 640 audio samples and 2 feature frames. Any input is resampled to this.

This module is the one definition; ``avatar.data.dataset``, ``avatar.audio.features``,
``avatar.media.audio`` and the service re-export the names they always had.

Conventions: frame ``i`` covers audio samples ``[640 i, 640 (i + 1))`` and feature frames
``[2 i, 2 i + 2)``.
"""

from __future__ import annotations

FPS = 25
AUDIO_RATE = 16_000
FEATURE_RATE = 50
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640
FEATURES_PER_FRAME = FEATURE_RATE // FPS  # 2
FEATURE_HOP = AUDIO_RATE // FEATURE_RATE  # 320 samples = 20 ms

__all__ = ["AUDIO_RATE", "FEATURES_PER_FRAME", "FEATURE_HOP", "FEATURE_RATE", "FPS", "SAMPLES_PER_FRAME"]
