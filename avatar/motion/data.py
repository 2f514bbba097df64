"""Training windows streamed from memory-mapped datasets (one per clip) for the motion models.

Nothing loads a whole corpus into RAM: each sample slices ``features.npy`` / ``lm3d.npy`` of one
clip (``np.memmap``), so an LRS3-sized directory of datasets costs only file handles.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from avatar.data.dataset import Dataset
from avatar.errors import ClipTooShort, FeatureMismatch, InvalidInput
from avatar.motion.syncnet import AUDIO_WIN, VIDEO_WIN

log = logging.getLogger(__name__)


class Clip:
    """One dataset's arrays for a frame range; ``expr(a, b)`` is ``lm3d[a:b] - lm3d_mean``."""

    def __init__(self, ds: Dataset, frames: range):
        self.ds, self.name = ds, ds.root.name
        self.start, self.stop = frames.start, frames.stop
        self.features, self.lm3d = ds.features, ds.lm3d
        self.mean = np.asarray(ds.lm3d_mean, dtype=np.float32)
        self.valid = ds.face_valid

    def __len__(self) -> int:
        return self.stop - self.start

    def expr(self, a: int, b: int) -> np.ndarray:
        """float32 [b - a, 68, 3], absolute frame indices."""
        return np.array(self.lm3d[a:b], dtype=np.float32) - self.mean

    def feats(self, a: int, b: int) -> np.ndarray:
        """float32 [2 (b - a), D] for frames [a, b)."""
        return np.array(self.features[2 * a : 2 * b], dtype=np.float32)  # a writable copy


class Corpus:
    """Clips of several datasets, sampled as fixed-length windows.

    Args:
        roots: dataset directories (``avatar preprocess`` outputs).
        part: "train" (each dataset's training range), "val" (its validation tail) or "all".
        min_frames: clips shorter than this (in the chosen part) are left out with a warning.
    Raises:
        InvalidInput: no usable clip. FeatureMismatch: datasets with different feature kinds/dims.
    """

    def __init__(self, roots: list[str | Path], part: str = "train", min_frames: int = 16):
        self.clips: list[Clip] = []
        kinds = set()
        for r in roots:
            ds = Dataset(r)
            rng = {"train": ds.train_range, "val": ds.val_range, "all": range(0, ds.n_frames)}[part]
            kinds.add((ds.feature_kind, int(ds.features.shape[1])))
            if len(rng) < min_frames:
                log.warning(
                    "%s: only %d %s frames (< %d); left out of the %s set", ds.root, len(rng), part, min_frames, part
                )
                continue
            self.clips.append(Clip(ds, rng))
        if len(kinds) > 1:
            raise FeatureMismatch(
                f"datasets have different audio features {sorted(kinds)}; preprocess them all with the same --features"
            )
        if not self.clips:
            raise InvalidInput(f"no clip has >= {min_frames} {part} frames; give longer clips")
        self.feature_kind, self.feature_dim = kinds.pop()
        self.lengths = np.array([len(c) for c in self.clips])

    @property
    def n_frames(self) -> int:
        return int(self.lengths.sum())

    def _pick(self, rng: np.random.Generator, window: int) -> tuple[int, int]:
        """A uniformly random window start over all clips: (clip index, absolute start frame)."""
        cache = self.__dict__.setdefault("_cum", {})
        if window not in cache:
            w = np.clip(self.lengths - window + 1, 0, None).astype(np.float64)
            if w.sum() == 0:
                raise ClipTooShort(f"no clip has {window} frames; lower the training window")
            cache[window] = np.cumsum(w)
        cum = cache[window]
        k = rng.random() * cum[-1]
        i = int(np.searchsorted(cum, k, side="right"))
        c = self.clips[i]
        return i, c.start + min(int(k - (cum[i - 1] if i else 0.0)), len(c) - window)

    def windows(
        self,
        rng: np.random.Generator,
        batch: int,
        window: int,
        silence: np.ndarray | None = None,
        silence_prob: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Random windows: features float32 [B, 2W, D], expression float32 [B, W, 68, 3].

        Silence augmentation: with probability ``silence_prob`` a random span (1/4 to all of the
        window) gets the features of digital silence (``silence`` [D]) and, as target, the clip's
        rest expression (:meth:`rest_expr`), teaching "no speech -> closed, still mouth".
        """
        f, e = [], []
        for _ in range(batch):
            i, a = self._pick(rng, window)
            fi, ei = self.clips[i].feats(a, a + window), self.clips[i].expr(a, a + window)
            if silence is not None and rng.random() < silence_prob:
                n = int(rng.integers(max(1, window // 4), window + 1))
                s = int(rng.integers(0, window - n + 1))
                fi[2 * s : 2 * (s + n)] = silence
                ei[s : s + n] = self.rest_expr(i)
            f.append(fi)
            e.append(ei)
        return np.stack(f), np.stack(e)

    def rest_expr(self, i: int) -> np.ndarray:
        """The clip's rest (closed-mouth) expression, float32 [68, 3]: mean of its frames whose
        inner-lip opening is in the lowest decile (cached)."""
        cache = self.__dict__.setdefault("_rest", {})
        if i not in cache:
            c = self.clips[i]
            lm = np.asarray(c.lm3d[c.start : c.stop], dtype=np.float32)
            opening = np.linalg.norm(lm[:, [61, 62, 63]] - lm[:, [67, 66, 65]], axis=-1).mean(-1)
            sel = opening <= np.percentile(opening, 10)
            cache[i] = lm[sel].mean(0) - c.mean
        return cache[i]

    def sync_pairs(
        self, rng: np.random.Generator, batch: int, min_shift: int = 5
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Half in-sync, half off-sync (mouth shifted >= ``min_shift`` frames, or another clip).

        Returns audio float32 [B, 10, D], mouth expression float32 [B, 5, 68, 3], label float32 [B].
        """
        need = VIDEO_WIN + 2 * min_shift + 1
        audio, mouth, label = [], [], []
        for k in range(batch):
            i, t = self._pick(rng, VIDEO_WIN)
            c = self.clips[i]
            audio.append(c.feats(t, t + VIDEO_WIN)[:AUDIO_WIN])
            pos = k % 2 == 0
            if pos:
                mouth.append(c.expr(t, t + VIDEO_WIN))
            elif len(self.clips) > 1 and (rng.random() < 0.3 or len(c) < need):
                j = int(rng.choice([x for x in range(len(self.clips)) if x != i]))
                cj = self.clips[j]
                u = cj.start + int(rng.integers(0, len(cj) - VIDEO_WIN + 1))
                mouth.append(cj.expr(u, u + VIDEO_WIN))
            else:
                if len(c) < need:
                    raise ClipTooShort(f"{c.name}: too short for off-sync pairs; give clips of >= {need} frames")
                u = t
                while abs(u - t) < min_shift:  # rejection sampling: >= 2/3 of starts qualify
                    u = c.start + int(rng.integers(0, len(c) - VIDEO_WIN + 1))
                mouth.append(c.expr(u, u + VIDEO_WIN))
            label.append(1.0 if pos else 0.0)
        return np.stack(audio), np.stack(mouth), np.array(label, dtype=np.float32)

    def fit_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Streamed per-dimension mean/std of features [D] and expression [204] (float64 sums)."""
        fs, fq, fn = np.zeros(self.feature_dim), np.zeros(self.feature_dim), 0
        es, eq, en = np.zeros(204), np.zeros(204), 0
        for c in self.clips:
            for a in range(c.start, c.stop, 2048):
                b = min(c.stop, a + 2048)
                f = c.feats(a, b).astype(np.float64)
                e = c.expr(a, b).reshape(b - a, 204).astype(np.float64)
                fs += f.sum(0)
                fq += (f**2).sum(0)
                fn += len(f)
                es += e.sum(0)
                eq += (e**2).sum(0)
                en += len(e)
        fm, em = fs / fn, es / en
        fstd = np.sqrt(np.maximum(fq / fn - fm**2, 0)) + 1e-5
        estd = np.sqrt(np.maximum(eq / en - em**2, 0)) + 1e-5
        return fm.astype(np.float32), fstd.astype(np.float32), em.astype(np.float32), estd.astype(np.float32)
