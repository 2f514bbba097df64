"""Face data contracts (docs/ARCHITECTURE.md "Data contracts"): the iBUG-300W landmark index groups,
the per-pixel mask labels and the pinhole intrinsics. Written by the face trackers
(``avatar/face/``), stored by the dataset format (``avatar/data/dataset.py`` re-exports every name)
and read by every training stage. Dependency-free apart from numpy, so the dataset format can sit
above the face trackers without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_BACKGROUND, MASK_TORSO, MASK_HEAD = 0, 1, 2

# iBUG-300W index groups (0-based)
JAW = list(range(0, 17))
BROWS = list(range(17, 27))
NOSE = list(range(27, 36))
LEFT_EYE = list(range(36, 42))  # subject's right eye in image-left position, iBUG convention
RIGHT_EYE = list(range(42, 48))
EYES = LEFT_EYE + RIGHT_EYE
MOUTH = list(range(48, 68))  # the 20 mouth landmarks (outer 48-59, inner 60-67)
INNER_UPPER, INNER_LOWER = [61, 62, 63], [67, 66, 65]  # facing inner-lip points (mouth opening)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of the stored frames."""

    fx: float
    fy: float
    cx: float
    cy: float

    def matrix(self) -> np.ndarray:
        """float64 [3, 3] camera matrix K."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)


def mouth_opening(lm: np.ndarray) -> np.ndarray:
    """Inner-lip opening per frame, float32 [N], in the landmarks' units (mean distance of the facing
    inner-lip points 61-63 / 67-65). lm: [N, 68, 3] or [N, 68, 2] iBUG-68 landmarks."""
    lm = np.asarray(lm, dtype=np.float32)
    return np.linalg.norm(lm[:, INNER_UPPER] - lm[:, INNER_LOWER], axis=-1).mean(-1)
