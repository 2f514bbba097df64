"""Media decode/encode (PyAV): probing, 25 fps video frames, 16 kHz mono audio, H.264/AAC MP4 output."""

from avatar.media.audio import AUDIO_RATE, load_audio, load_audio_native, resample_audio, write_wav
from avatar.media.video import MediaInfo, VideoWriter, count_resampled_frames, iter_video_frames, probe

__all__ = [
    "AUDIO_RATE",
    "MediaInfo",
    "VideoWriter",
    "count_resampled_frames",
    "iter_video_frames",
    "load_audio",
    "load_audio_native",
    "probe",
    "resample_audio",
    "write_wav",
]
