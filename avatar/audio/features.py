"""Audio features at 50 Hz (2 per 25 fps video frame): 80-bin log-mel and HuBERT.

Time convention (``avatar/timebase.py``, docs/ARCHITECTURE.md "Data contracts"): on 16 kHz mono audio,
feature frame ``t`` is centred on sample ``320 t + 160``, i.e. on time ``(t + 0.5) / 50`` s, so
feature frames ``[2i, 2i + 2)`` lie inside video frame ``i``'s audio ``[640 i, 640 (i + 1))``.
A waveform of ``T`` samples gives ``F = ceil(T / 320)`` frames; audio beyond the signal's ends is
zeros.

* ``"mel"``: magnitude STFT (Hann window 640 samples = 40 ms, n_fft 1024, hop 320 = 20 ms) ->
  80 mel bands 55-7600 Hz (librosa's Slaney mel filters) -> ``log10(max(mel, 1e-5))``. Each frame
  depends only on its own 1024-sample window, so chunked and streaming extraction are exact.
* ``"hubert"``: ``transformers.HubertModel`` ``last_hidden_state`` (GeneFace, Ye et al. ICLR 2023,
  Sec. 3.1 uses ``facebook/hubert-large-ls960-ft``, 1024-d). HuBERT's conv front end has a receptive
  field of 400 samples and a stride of 320 (Hsu et al. 2021); the waveform is padded with 40 zeros
  on the left so frame ``t`` sees samples ``[320 t - 40, 320 t + 360)``, centred like the mel frames.
  The input is normalised to zero mean / unit variance (as ``Wav2Vec2FeatureExtractor`` with
  ``do_normalize``) per processing window.

Long audio is processed in blocks of ``chunk_s`` seconds, each computed over a window extended by
``context_s`` seconds on both sides (clipped at the signal's ends) of which only the block is kept.
HuBERT's positional convolution (+-64 frames for the large model) and global self-attention make
every output depend on the whole window, so block processing equals a single pass only
approximately (the measured difference is reported in ``bench/RESULTS.md`` and tested); the
streaming extractor uses the very same block/window arithmetic, so streaming output equals
:func:`extract_features` with the same ``chunk_s``/``context_s`` to float precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from avatar.errors import InvalidInput, NoAudio
from avatar.runtime import resolve_device
from avatar.timebase import AUDIO_RATE, FEATURE_HOP, FEATURE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

FEATURE_KINDS = ("mel", "hubert")
HOP = FEATURE_HOP  # 320 samples = 20 ms
SAMPLES_PER_VIDEO_FRAME = SAMPLES_PER_FRAME  # 640: 25 fps

MEL_N_FFT = 1024
MEL_WIN = 640
MEL_N_MELS = 80
MEL_FMIN = 55.0
MEL_FMAX = 7600.0
MEL_LOG_FLOOR = 1e-5

HUBERT_RF = 400
HUBERT_LEFT_PAD = (HUBERT_RF - HOP) // 2  # 40 samples: centre frame t on 320 t + 160


def n_feature_frames(n_samples: int) -> int:
    """Number of 50 Hz feature frames for ``n_samples`` of 16 kHz audio: ``ceil(n_samples / 320)``."""
    return -(-int(n_samples) // HOP)


def check_wav(wav: np.ndarray) -> np.ndarray:
    """Validate a 16 kHz mono waveform; returns it as a contiguous float32 ``[T]``.

    Raises:
        InvalidInput: not a 1-D float array, or NaN/inf samples.
        NoAudio: zero samples.
    """
    if not isinstance(wav, np.ndarray):
        raise InvalidInput(f"audio must be a numpy float32 array [T] at 16 kHz, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise InvalidInput(
            f"audio must be mono [T] at 16 kHz, got shape {list(wav.shape)}; use avatar.media.load_audio "
            "or resample_audio to convert"
        )
    if not np.issubdtype(wav.dtype, np.floating):
        raise InvalidInput(
            f"audio must be float samples in [-1, 1], got dtype {wav.dtype}; use avatar.media.resample_audio"
        )
    if wav.size == 0:
        raise NoAudio("the audio has zero samples; pass speech audio")
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if not np.all(np.isfinite(wav)):
        raise InvalidInput("audio contains NaN or infinite samples")
    return wav


def _segment(wav: np.ndarray, s0: int, s1: int, offset: int = 0) -> np.ndarray:
    """Global samples ``[s0, s1)`` of a signal whose samples ``[offset, offset + len(wav))`` are
    ``wav``; everything outside is zeros."""
    out = np.zeros(s1 - s0, np.float32)
    a, b = max(s0, offset), min(s1, offset + len(wav))
    if b > a:
        out[a - s0 : b - s0] = wav[a - offset : b - offset]
    return out


# ---------------------------------------------------------------------------------------- backends
class _MelBackend:
    kind = "mel"
    dim = MEL_N_MELS
    #: audio needed before / after a frame's first / last sample position ``320 t``
    left = MEL_N_FFT // 2 - HOP // 2  # 352
    right = MEL_N_FFT // 2 + HOP // 2  # 672 (frame t ends at 320 t + 672)

    def __init__(self):
        import librosa

        self._librosa = librosa
        self._basis = librosa.filters.mel(
            sr=AUDIO_RATE, n_fft=MEL_N_FFT, n_mels=MEL_N_MELS, fmin=MEL_FMIN, fmax=MEL_FMAX
        ).astype(np.float32)
        self._window = np.zeros(MEL_N_FFT, np.float32)
        o = (MEL_N_FFT - MEL_WIN) // 2
        self._window[o : o + MEL_WIN] = np.hanning(MEL_WIN + 1)[:-1]  # periodic Hann, centred in n_fft

    def span(self, a: int, b: int) -> tuple[int, int]:
        return HOP * a - self.left, HOP * (b - 1) + self.right

    def compute(self, seg: np.ndarray, real: tuple[int, int]) -> np.ndarray:
        del real
        frames = np.lib.stride_tricks.sliding_window_view(seg, MEL_N_FFT)[::HOP]
        spec = np.abs(np.fft.rfft(frames * self._window, axis=1)).astype(np.float32)  # [F, 513]
        mel = spec @ self._basis.T  # [F, 80]
        return np.log10(np.maximum(mel, MEL_LOG_FLOOR)).astype(np.float32)

    def describe(self) -> dict:
        return {
            "n_fft": MEL_N_FFT,
            "win_length": MEL_WIN,
            "hop_length": HOP,
            "n_mels": MEL_N_MELS,
            "fmin": MEL_FMIN,
            "fmax": MEL_FMAX,
            "window": "hann",
            "log": "log10(max(mel_magnitude, 1e-5))",
            "librosa": self._librosa.__version__,  # type: ignore[attr-defined]
        }


_MODEL_CACHE: dict[tuple[str, str], object] = {}
_MODEL_LOCK = threading.Lock()


def _resolve_device(device: str | None) -> str:
    if device:
        return device
    return str(resolve_device())


class _HubertBackend:
    kind = "hubert"
    left = HUBERT_LEFT_PAD  # frame t starts at 320 t - 40
    right = HUBERT_RF - HUBERT_LEFT_PAD  # and ends at 320 t + 360

    def __init__(self, hubert_path: str | Path | None, device: str | None = None):
        self.path = _check_hubert_dir(hubert_path)
        self.device = _resolve_device(device)
        self.model = _load_hubert(self.path, self.device)
        self.dim = int(self.model.config.hidden_size)
        pre = self.path / "preprocessor_config.json"
        self.do_normalize = bool(json.loads(pre.read_text()).get("do_normalize", True)) if pre.is_file() else True

    def span(self, a: int, b: int) -> tuple[int, int]:
        return HOP * a - self.left, HOP * (b - 1) + self.right

    def compute(self, seg: np.ndarray, real: tuple[int, int]) -> np.ndarray:
        import torch

        if self.do_normalize:
            r0, r1 = real
            x = seg[r0:r1]
            if x.size:
                seg = seg.copy()
                seg[r0:r1] = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        with torch.inference_mode():
            inp = torch.from_numpy(seg)[None].to(self.device)
            out = self.model(inp).last_hidden_state[0]
        return out.float().cpu().numpy()

    def describe(self) -> dict:
        cfg = self.path / "config.json"
        weights = sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin"))
        return {
            "model": self.model.config.name_or_path or self.path.name,
            "model_dir": str(self.path),
            "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest(),
            "weights_bytes": int(sum(p.stat().st_size for p in weights)),
            "layers": int(self.model.config.num_hidden_layers),
            "input_normalization": "per window" if self.do_normalize else "none",
            "left_pad_samples": HUBERT_LEFT_PAD,
        }


def _check_hubert_dir(hubert_path: str | Path | None) -> Path:
    expected = (
        "a local directory with a HuBERT checkpoint saved by transformers' save_pretrained "
        "(config.json with model_type 'hubert' + model.safetensors), e.g. "
        "facebook/hubert-large-ls960-ft downloaded elsewhere and copied here; or use kind='mel'"
    )
    if hubert_path is None:
        raise InvalidInput(f"kind='hubert' needs hubert_path: {expected}")
    path = Path(hubert_path)
    if not path.is_dir():
        raise InvalidInput(f"HuBERT directory {path} not found; expected {expected}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise InvalidInput(f"{path} has no config.json; expected {expected}")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{cfg} is not valid JSON ({e}); expected {expected}") from e
    if model_type != "hubert":
        raise InvalidInput(f"{path} holds a {model_type!r} model, not HuBERT; expected {expected}")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise InvalidInput(
            f"{path} has no .safetensors weights (pickled .bin weights are not loaded); expected {expected}"
        )
    return path.resolve()


def _load_hubert(path: Path, device: str):
    key = (str(path), device)
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get(key)
        if model is None:
            from transformers import HubertModel

            try:
                model = HubertModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            except (OSError, ValueError, KeyError) as e:
                raise InvalidInput(f"could not load HuBERT from {path} ({e}); save it with save_pretrained") from e
            model.eval().to(device)
            log.info(
                "loaded HuBERT from %s on %s (%d layers, %d-d)",
                path,
                device,
                model.config.num_hidden_layers,
                model.config.hidden_size,
            )
            _MODEL_CACHE[key] = model
    return model


def _make_backend(kind: str, hubert_path=None, device=None):
    if kind == "mel":
        return _MelBackend()
    if kind == "hubert":
        return _HubertBackend(hubert_path, device)
    raise InvalidInput(f"unknown audio feature kind {kind!r}; choose one of {FEATURE_KINDS}")


def _context_frames(backend, context_s: float | None) -> int:
    if backend.kind == "mel":
        return 0  # every mel frame depends only on its own window: exact without context
    return max(0, int(round((5.0 if context_s is None else context_s) * FEATURE_RATE)))


def _run_block(
    backend, wav: np.ndarray, offset: int, a: int, b: int, n_total: int, ctx: int, n_samples: int
) -> np.ndarray:
    """Frames ``[a, b)`` computed over window ``[a - ctx, b + ctx)`` clipped to ``[0, n_total)``."""
    wa, wb = max(0, a - ctx), min(n_total, b + ctx)
    s0, s1 = backend.span(wa, wb)
    seg = _segment(wav, s0, s1, offset)
    real = (max(0, -s0), min(s1, n_samples) - s0)
    out = backend.compute(seg, real)
    if out.shape[0] != wb - wa:
        raise RuntimeError(f"{backend.kind} produced {out.shape[0]} frames for a window of {wb - wa}")
    return out[a - wa : b - wa]


def fit_to_video(features: np.ndarray, n_frames: int) -> np.ndarray:
    """Trim or pad ``features [F, D]`` to exactly ``2 * n_frames`` rows (padding repeats the last
    row: "edge" padding; at most a few frames are ever added since ``F = ceil(T / 320)``)."""
    if n_frames is None:
        return features
    if int(n_frames) <= 0:
        raise InvalidInput(f"n_frames must be > 0 video frames, got {n_frames}")
    target = 2 * int(n_frames)
    if features.shape[0] >= target:
        return features[:target]
    pad = np.repeat(features[-1:], target - features.shape[0], axis=0)
    return np.concatenate([features, pad], axis=0)


def _extract(backend, wav: np.ndarray, n_frames: int | None, chunk_s: float, context_s: float | None) -> np.ndarray:
    wav = check_wav(wav)
    if chunk_s is None or chunk_s <= 0:
        raise InvalidInput(f"chunk_s must be > 0 seconds, got {chunk_s}")
    n_total = n_feature_frames(len(wav))
    block = max(1, int(round(chunk_s * FEATURE_RATE)))
    ctx = _context_frames(backend, context_s)
    parts = [
        _run_block(backend, wav, 0, a, min(a + block, n_total), n_total, ctx, len(wav))
        for a in range(0, n_total, block)
    ]
    feats = np.concatenate(parts, axis=0).astype(np.float32, copy=False)
    return fit_to_video(feats, n_frames)


def extract_features(
    wav: np.ndarray,
    kind: str = "mel",
    hubert_path: str | Path | None = None,
    n_frames: int | None = None,
    chunk_s: float = 30.0,
    context_s: float | None = None,
) -> np.ndarray:
    """Audio features at exactly 50 Hz from a 16 kHz mono waveform.

    Frame ``t`` is centred on time ``(t + 0.5) / 50`` s (sample ``320 t + 160``); see the module
    docstring for each kind's receptive field.

    Args:
        wav: float32 ``[T]`` mono at 16 kHz in [-1, 1].
        kind: ``"mel"`` (80-d log-mel) or ``"hubert"`` (``hidden_size``-d, 1024 for HuBERT-large).
        hubert_path: local directory of a HuBERT checkpoint (``save_pretrained`` format), needed
            for ``kind="hubert"``; runs on CUDA when available.
        n_frames: if given (number of 25 fps video frames), the output has exactly
            ``2 * n_frames`` rows: extra frames are trimmed, missing ones repeat the last frame.
        chunk_s: block length in seconds for bounded memory on long audio.
        context_s: HuBERT only: extra audio on both sides of each block, in seconds (default 5 s);
            mel needs none (exact).

    Returns:
        float32 ``[F, D]`` with ``F = ceil(T / 320)`` (or ``2 * n_frames``).

    Raises:
        NoAudio: empty audio.
        InvalidInput: wrong dtype/shape, unknown kind, missing or invalid HuBERT directory.
    """
    backend = _make_backend(kind, hubert_path)
    return _extract(backend, wav, n_frames, chunk_s, context_s)


class FeatureExtractor:
    """Reusable extractor of one feature kind (caches the loaded HuBERT model).

    Args:
        kind: ``"mel"`` or ``"hubert"``.
        hubert_path: HuBERT checkpoint directory (``kind="hubert"``).
        device: torch device for HuBERT (default CUDA when available, else CPU).
        chunk_s, context_s: as in :func:`extract_features`.

    Attributes:
        kind, dim (feature size D), hubert_path.

    Raises:
        InvalidInput: unknown kind or an invalid HuBERT directory.
    """

    def __init__(
        self,
        kind: str = "mel",
        hubert_path: str | Path | None = None,
        device: str | None = None,
        chunk_s: float = 30.0,
        context_s: float | None = None,
    ):
        self._backend = _make_backend(kind, hubert_path, device)
        self.kind = kind
        self.dim = int(self._backend.dim)
        self.hubert_path = str(self._backend.path) if kind == "hubert" else None
        self.chunk_s = chunk_s
        self.context_s = context_s

    def __call__(self, wav: np.ndarray, n_frames: int | None = None) -> np.ndarray:
        """Features float32 ``[F, D]`` at 50 Hz (see :func:`extract_features`)."""
        return _extract(self._backend, wav, n_frames, self.chunk_s, self.context_s)

    def describe(self) -> dict:
        """JSON-able description stored in dataset/bundle manifests; models must refuse features
        whose description (kind, dim) differs from the one they were trained on."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "rate_hz": FEATURE_RATE,
            "sample_rate_hz": AUDIO_RATE,
            "frame_centre": "(t + 0.5) / 50 s",
            "chunk_s": self.chunk_s,
            "context_s": None if self.kind == "mel" else _context_frames(self._backend, self.context_s) / FEATURE_RATE,
            **self._backend.describe(),
        }


class StreamingFeatureExtractor:
    """Incremental feature extraction for real-time audio (gRPC streaming).

    ``push`` returns the feature frames that are final given the audio so far; ``flush`` returns
    the rest once the stream ends. The concatenation over any chunking of the input equals
    ``extract_features(wav, kind, chunk_s=block_s, context_s=context_s)`` on the whole audio (mel:
    exactly, block_s irrelevant; HuBERT: identical windows, so to float precision).

    Args:
        kind: ``"mel"`` or ``"hubert"``.
        hubert_path: HuBERT checkpoint directory (``kind="hubert"``).
        device: torch device for HuBERT.
        block_s: HuBERT: frames are produced in blocks of this many seconds (0.2 s = 10 frames).
        context_s: HuBERT: audio on both sides of each block fed to the model (0.4 s default).

    Attributes:
        dim: feature size D.
        lookahead_samples: worst-case audio (16 kHz samples) needed after a feature frame's centre
            before that frame is final (mel: 512 = 32 ms; HuBERT: ``320 (block + context) - 120``).
    """

    def __init__(
        self,
        kind: str = "mel",
        hubert_path: str | Path | None = None,
        device: str | None = None,
        block_s: float = 0.2,
        context_s: float = 0.4,
    ):
        self._backend = _make_backend(kind, hubert_path, device)
        self.kind = kind
        self.dim = int(self._backend.dim)
        self._ctx = _context_frames(self._backend, context_s)
        self._block = max(1, int(round(block_s * FEATURE_RATE)))
        self.block_s = self._block / FEATURE_RATE
        self.context_s = self._ctx / FEATURE_RATE
        self.reset()

    @property
    def lookahead_samples(self) -> int:
        block = 1 if self._ctx == 0 else self._block
        # first frame a of a block is final once sample span(..., a + block + ctx) ends
        return HOP * (block - 1 + self._ctx) + self._backend.right - HOP // 2

    def reset(self) -> None:
        """Forget all audio (start a new utterance)."""
        self._buf = np.zeros(0, np.float32)
        self._buf_start = 0  # global sample index of self._buf[0]
        self._n = 0  # samples received
        self._next = 0  # next feature frame to emit
        self._done = False

    def _drop_consumed(self) -> None:
        keep_from = self._backend.span(max(0, self._next - self._ctx), self._next + 1)[0]
        cut = keep_from - self._buf_start
        if cut > 0:
            self._buf = self._buf[cut:]
            self._buf_start += cut

    def push(self, wav_chunk: np.ndarray) -> np.ndarray:
        """Add audio (float32 ``[k]`` mono 16 kHz, any length incl. 0); return newly final frames.

        Returns:
            float32 ``[m, D]`` (``m`` may be 0).

        Raises:
            InvalidInput: wrong dtype/shape, or ``push`` after ``flush`` without ``reset``.
        """
        if self._done:
            raise InvalidInput("push after flush: call reset() to start a new stream")
        if isinstance(wav_chunk, np.ndarray) and wav_chunk.ndim == 1 and wav_chunk.size == 0:
            return np.zeros((0, self.dim), np.float32)
        x = check_wav(wav_chunk)
        self._buf = np.concatenate([self._buf, x])
        self._n += len(x)
        outs = []
        if self._ctx == 0:  # frames are independent: emit every frame whose window is complete
            last = (self._n - self._backend.right) // HOP  # largest t with 320 t + right <= n
            if last >= self._next:
                outs.append(self._compute(self._next, last + 1, None))
                self._next = last + 1
        else:
            while True:
                a, b = self._next, self._next + self._block
                if self._backend.span(a, b + self._ctx)[1] > self._n:
                    break
                outs.append(self._compute(a, b, None))
                self._next = b
        self._drop_consumed()
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)

    def _compute(self, a: int, b: int, n_total: int | None) -> np.ndarray:
        total = n_total if n_total is not None else b + self._ctx
        n_samples = self._n if n_total is not None else 1 << 62
        return _run_block(self._backend, self._buf, self._buf_start, a, b, total, self._ctx, n_samples)

    def flush(self) -> np.ndarray:
        """End of stream: return the remaining frames (up to ``ceil(total_samples / 320)``).

        Returns:
            float32 ``[m, D]``.
        """
        if self._done:
            return np.zeros((0, self.dim), np.float32)
        self._done = True
        n_total = n_feature_frames(self._n)
        outs = []
        block = self._block if self._ctx else max(1, n_total - self._next)
        for a in range(self._next, n_total, block):
            outs.append(self._compute(a, min(a + block, n_total), n_total))
        self._next = n_total
        return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, self.dim), np.float32)


@dataclass
class FeatureStats:
    """Per-dimension mean/std of audio features, stored with models for input normalisation.

    Attributes:
        mean, std: float32 ``[D]``.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features_iter: Iterable[np.ndarray], min_std: float = 1e-5) -> "FeatureStats":
        """Accumulate over an iterable of ``[F_i, D]`` arrays (float64 sums; one pass).

        Raises:
            InvalidInput: no frames, or arrays of different D.
        """
        n, s, ss, dim = 0, None, None, None
        for f in features_iter:
            f = np.asarray(f, dtype=np.float64)
            if f.ndim != 2:
                raise InvalidInput(f"features must be [F, D], got shape {list(f.shape)}")
            if dim is None:
                dim, s, ss = f.shape[1], np.zeros(f.shape[1]), np.zeros(f.shape[1])
            elif f.shape[1] != dim:
                raise InvalidInput(f"feature dims differ: {dim} vs {f.shape[1]}")
            n += f.shape[0]
            s += f.sum(0)
            ss += (f * f).sum(0)
        if not n:
            raise InvalidInput("no feature frames to fit normalisation statistics on")
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)
        return cls(mean.astype(np.float32), np.maximum(np.sqrt(var), min_std).astype(np.float32))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` for ``x [..., D]``; float32.

        Raises:
            FeatureMismatch: the last dimension is not D.
        """
        from avatar.errors import FeatureMismatch

        x = np.asarray(x)
        if x.shape[-1] != self.mean.shape[0]:
            raise FeatureMismatch(
                f"features have dim {x.shape[-1]}, the stats were fitted on dim {self.mean.shape[0]}; "
                "extract the same feature kind the model was trained with"
            )
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.astype(float).tolist(), "std": self.std.astype(float).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureStats":
        """Inverse of :meth:`to_dict`.

        Raises:
            InvalidInput: missing keys or mismatched lengths.
        """
        try:
            mean, std = np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"feature stats need 'mean' and 'std' lists ({e})") from e
        if mean.ndim != 1 or mean.shape != std.shape or np.any(std <= 0):
            raise InvalidInput("feature stats 'mean'/'std' must be equal-length lists with std > 0")
        return cls(mean, std)


def audio_energy(wav: np.ndarray, n_frames: int) -> np.ndarray:
    """RMS energy per 25 fps video frame: frame ``i`` covers samples ``[640 i, 640 (i + 1))``
    (zeros beyond the end).

    Args:
        wav: float32 ``[T]`` mono 16 kHz.
        n_frames: number of video frames.

    Returns:
        float32 ``[n_frames]`` RMS amplitude (same units as the samples, 0 = silence).

    Raises:
        NoAudio: empty audio. InvalidInput: wrong dtype/shape or ``n_frames <= 0``.
    """
    wav = check_wav(wav)
    if int(n_frames) <= 0:
        raise InvalidInput(f"n_frames must be > 0, got {n_frames}")
    x = _segment(wav, 0, int(n_frames) * SAMPLES_PER_VIDEO_FRAME).reshape(int(n_frames), SAMPLES_PER_VIDEO_FRAME)
    return np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1)).astype(np.float32)


def silence_features(kind: str, hubert_path: str | None = None) -> np.ndarray:
    """Features of digital silence, float32 [D] (the middle frame of 2 s of zeros)."""
    return extract_features(np.zeros(32000, np.float32), kind, hubert_path=hubert_path, n_frames=50)[50]
