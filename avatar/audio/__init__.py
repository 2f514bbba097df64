"""Audio features at 50 Hz (2 per 25 fps video frame): log-mel and HuBERT, batch and streaming."""

from avatar.audio.features import (
    FEATURE_KINDS,
    FEATURE_RATE,
    FeatureExtractor,
    FeatureStats,
    StreamingFeatureExtractor,
    audio_energy,
    extract_features,
    fit_to_video,
    n_feature_frames,
    silence_features,
)

__all__ = [
    "FEATURE_KINDS",
    "FEATURE_RATE",
    "FeatureExtractor",
    "FeatureStats",
    "StreamingFeatureExtractor",
    "audio_energy",
    "extract_features",
    "fit_to_video",
    "n_feature_frames",
    "silence_features",
]
