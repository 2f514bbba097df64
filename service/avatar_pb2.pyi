from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat

class ListAvatarsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAvatarsResponse(_message.Message):
    __slots__ = ("avatars",)
    AVATARS_FIELD_NUMBER: _ClassVar[int]
    avatars: _containers.RepeatedCompositeFieldContainer[AvatarInfo]
    def __init__(self, avatars: _Optional[_Iterable[_Union[AvatarInfo, _Mapping]]] = ...) -> None: ...

class GetAvatarRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AvatarInfo(_message.Message):
    __slots__ = ("name", "size", "fps", "created", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    fps: float
    created: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., fps: _Optional[float] = ..., created: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RenderOptions(_message.Message):
    __slots__ = ("emotion", "emotion_strength", "still", "blink", "blink_rate", "temperature", "seed", "size", "head_speed", "head_amplitude", "lle_blend")
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    EMOTION_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    STILL_FIELD_NUMBER: _ClassVar[int]
    BLINK_FIELD_NUMBER: _ClassVar[int]
    BLINK_RATE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SPEED_FIELD_NUMBER: _ClassVar[int]
    HEAD_AMPLITUDE_FIELD_NUMBER: _ClassVar[int]
    LLE_BLEND_FIELD_NUMBER: _ClassVar[int]
    emotion: str
    emotion_strength: float
    still: bool
    blink: bool
    blink_rate: float
    temperature: float
    seed: int
    size: int
    head_speed: float
    head_amplitude: float
    lle_blend: float
    def __init__(self, emotion: _Optional[str] = ..., emotion_strength: _Optional[float] = ..., still: _Optional[bool] = ..., blink: _Optional[bool] = ..., blink_rate: _Optional[float] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., size: _Optional[int] = ..., head_speed: _Optional[float] = ..., head_amplitude: _Optional[float] = ..., lle_blend: _Optional[float] = ...) -> None: ...

class FrameEncoding(_message.Message):
    __slots__ = ("format", "jpeg_quality")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    format: ImageFormat
    jpeg_quality: int
    def __init__(self, format: _Optional[_Union[ImageFormat, str]] = ..., jpeg_quality: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("index", "timestamp_s", "image", "format", "audio", "idle")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    index: int
    timestamp_s: float
    image: bytes
    format: ImageFormat
    audio: bytes
    idle: bool
    def __init__(self, index: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., image: _Optional[bytes] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., audio: _Optional[bytes] = ..., idle: _Optional[bool] = ...) -> None: ...

class RenderRequest(_message.Message):
    __slots__ = ("avatar", "audio", "options", "encoding")
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    avatar: str
    audio: bytes
    options: RenderOptions
    encoding: FrameEncoding
    def __init__(self, avatar: _Optional[str] = ..., audio: _Optional[bytes] = ..., options: _Optional[_Union[RenderOptions, _Mapping]] = ..., encoding: _Optional[_Union[FrameEncoding, _Mapping]] = ...) -> None: ...

class RenderHeader(_message.Message):
    __slots__ = ("request_id", "avatar", "size", "fps", "total_frames", "audio_duration_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    avatar: AvatarInfo
    size: int
    fps: float
    total_frames: int
    audio_duration_s: float
    def __init__(self, request_id: _Optional[str] = ..., avatar: _Optional[_Union[AvatarInfo, _Mapping]] = ..., size: _Optional[int] = ..., fps: _Optional[float] = ..., total_frames: _Optional[int] = ..., audio_duration_s: _Optional[float] = ...) -> None: ...

class RenderSummary(_message.Message):
    __slots__ = ("frames", "audio_duration_s", "render_s", "first_frame_latency_s")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    RENDER_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    frames: int
    audio_duration_s: float
    render_s: float
    first_frame_latency_s: float
    def __init__(self, frames: _Optional[int] = ..., audio_duration_s: _Optional[float] = ..., render_s: _Optional[float] = ..., first_frame_latency_s: _Optional[float] = ...) -> None: ...

class RenderResponse(_message.Message):
    __slots__ = ("header", "frame", "summary")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    header: RenderHeader
    frame: Frame
    summary: RenderSummary
    def __init__(self, header: _Optional[_Union[RenderHeader, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., summary: _Optional[_Union[RenderSummary, _Mapping]] = ...) -> None: ...

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate")
    class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENCODING_PCM16: _ClassVar[AudioFormat.Encoding]
        ENCODING_FLOAT32: _ClassVar[AudioFormat.Encoding]
    ENCODING_PCM16: AudioFormat.Encoding
    ENCODING_FLOAT32: AudioFormat.Encoding
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioFormat.Encoding
    sample_rate: int
    def __init__(self, encoding: _Optional[_Union[AudioFormat.Encoding, str]] = ..., sample_rate: _Optional[int] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("avatar", "audio_format", "options", "encoding", "realtime", "idle_frames", "output_audio", "frame_audio", "block", "nerf_right")
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    REALTIME_FIELD_NUMBER: _ClassVar[int]
    IDLE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    FRAME_AUDIO_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    NERF_RIGHT_FIELD_NUMBER: _ClassVar[int]
    avatar: str
    audio_format: AudioFormat
    options: RenderOptions
    encoding: FrameEncoding
    realtime: bool
    idle_frames: bool
    output_audio: AudioFormat
    frame_audio: bool
    block: int
    nerf_right: int
    def __init__(self, avatar: _Optional[str] = ..., audio_format: _Optional[_Union[AudioFormat, _Mapping]] = ..., options: _Optional[_Union[RenderOptions, _Mapping]] = ..., encoding: _Optional[_Union[FrameEncoding, _Mapping]] = ..., realtime: _Optional[bool] = ..., idle_frames: _Optional[bool] = ..., output_audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., frame_audio: _Optional[bool] = ..., block: _Optional[int] = ..., nerf_right: _Optional[int] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class OptionsUpdate(_message.Message):
    __slots__ = ("emotion", "emotion_strength")
    EMOTION_FIELD_NUMBER: _ClassVar[int]
    EMOTION_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    emotion: str
    emotion_strength: float
    def __init__(self, emotion: _Optional[str] = ..., emotion_strength: _Optional[float] = ...) -> None: ...

class EndOfAudio(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Interrupt(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamRenderRequest(_message.Message):
    __slots__ = ("config", "audio", "options_update", "end_of_audio", "interrupt")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    END_OF_AUDIO_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    audio: AudioChunk
    options_update: OptionsUpdate
    end_of_audio: EndOfAudio
    interrupt: Interrupt
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., options_update: _Optional[_Union[OptionsUpdate, _Mapping]] = ..., end_of_audio: _Optional[_Union[EndOfAudio, _Mapping]] = ..., interrupt: _Optional[_Union[Interrupt, _Mapping]] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("request_id", "avatar", "size", "fps", "lookahead_s", "start_time_unix_ns", "output_audio", "max_idle_s", "idle_frames", "block", "nerf_right")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_S_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    MAX_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    NERF_RIGHT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    avatar: AvatarInfo
    size: int
    fps: float
    lookahead_s: float
    start_time_unix_ns: int
    output_audio: AudioFormat
    max_idle_s: float
    idle_frames: bool
    block: int
    nerf_right: int
    def __init__(self, request_id: _Optional[str] = ..., avatar: _Optional[_Union[AvatarInfo, _Mapping]] = ..., size: _Optional[int] = ..., fps: _Optional[float] = ..., lookahead_s: _Optional[float] = ..., start_time_unix_ns: _Optional[int] = ..., output_audio: _Optional[_Union[AudioFormat, _Mapping]] = ..., max_idle_s: _Optional[float] = ..., idle_frames: _Optional[bool] = ..., block: _Optional[int] = ..., nerf_right: _Optional[int] = ...) -> None: ...

class StreamSummary(_message.Message):
    __slots__ = ("frames", "audio_duration_s", "first_frame_latency_s", "idle_frames", "interrupts")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTS_FIELD_NUMBER: _ClassVar[int]
    frames: int
    audio_duration_s: float
    first_frame_latency_s: float
    idle_frames: int
    interrupts: int
    def __init__(self, frames: _Optional[int] = ..., audio_duration_s: _Optional[float] = ..., first_frame_latency_s: _Optional[float] = ..., idle_frames: _Optional[int] = ..., interrupts: _Optional[int] = ...) -> None: ...

class Interrupted(_message.Message):
    __slots__ = ("next_frame", "dropped_audio_s", "dropped_frames")
    NEXT_FRAME_FIELD_NUMBER: _ClassVar[int]
    DROPPED_AUDIO_S_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    next_frame: int
    dropped_audio_s: float
    dropped_frames: int
    def __init__(self, next_frame: _Optional[int] = ..., dropped_audio_s: _Optional[float] = ..., dropped_frames: _Optional[int] = ...) -> None: ...

class StreamRenderResponse(_message.Message):
    __slots__ = ("header", "frame", "summary", "interrupted")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    frame: Frame
    summary: StreamSummary
    interrupted: Interrupted
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., summary: _Optional[_Union[StreamSummary, _Mapping]] = ..., interrupted: _Optional[_Union[Interrupted, _Mapping]] = ...) -> None: ...

class OnboardMetadata(_message.Message):
    __slots__ = ("name", "preset", "overwrite", "filename")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    preset: str
    overwrite: bool
    filename: str
    def __init__(self, name: _Optional[str] = ..., preset: _Optional[str] = ..., overwrite: _Optional[bool] = ..., filename: _Optional[str] = ...) -> None: ...

class OnboardRequest(_message.Message):
    __slots__ = ("metadata", "video_chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    VIDEO_CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: OnboardMetadata
    video_chunk: bytes
    def __init__(self, metadata: _Optional[_Union[OnboardMetadata, _Mapping]] = ..., video_chunk: _Optional[bytes] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "avatar", "state", "stage", "progress", "message", "error_code", "error", "created_unix", "started_unix", "finished_unix", "queue_position")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        STATE_QUEUED: _ClassVar[Job.State]
        STATE_RUNNING: _ClassVar[Job.State]
        STATE_SUCCEEDED: _ClassVar[Job.State]
        STATE_FAILED: _ClassVar[Job.State]
        STATE_CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    STATE_QUEUED: Job.State
    STATE_RUNNING: Job.State
    STATE_SUCCEEDED: Job.State
    STATE_FAILED: Job.State
    STATE_CANCELLED: Job.State
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    avatar: str
    state: Job.State
    stage: str
    progress: float
    message: str
    error_code: str
    error: str
    created_unix: float
    started_unix: float
    finished_unix: float
    queue_position: int
    def __init__(self, job_id: _Optional[str] = ..., avatar: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., stage: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ..., created_unix: _Optional[float] = ..., started_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ..., queue_position: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("avatar", "limit")
    AVATAR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    avatar: str
    limit: int
    def __init__(self, avatar: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...
