"""Inference API: ``load_nerf(dir) -> AvatarNerf`` renders composited frames from landmarks + pose."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from avatar.data.dataset import Intrinsics
from avatar.errors import BundleCorrupt, InvalidInput
from avatar.nerf.model import HeadNerf, TorsoNerf, load_head, load_torso
from avatar.nerf.rays import box_pixel_bounds_batch, camera_rays
from avatar.nerf.render import composite, render_head_rays
from avatar.runtime import configure_threads, resolve_device

log = logging.getLogger(__name__)

CHUNK_CPU = 8192
"""Head rays per field call on CPU (torso pixels: 4x)."""
CHUNK_CUDA = 1 << 17
"""Head rays per field call on CUDA: a 512 px batch of 8 frames is ~10 calls instead of ~150."""


class AvatarNerf:
    """Head (+ torso) NeRF of one person, ready to render.

    Attributes:
        size: native frame side (pixels) the models were trained at.
        intrinsics: :class:`Intrinsics` at ``size``.
        window: W, frames of landmarks the condition attention smooths over (centred window).
        head_scale: metres per canonical landmark unit.
        chunk: head rays per field call (default :data:`CHUNK_CPU` / :data:`CHUNK_CUDA` by device).
    """

    def __init__(
        self,
        head: HeadNerf,
        torso: TorsoNerf | None,
        size: int,
        intrinsics: Intrinsics,
        head_scale: float,
        window: int,
        device: torch.device | str | None = None,
        n_samples: int = 32,
        chunk: int | None = None,
    ):
        self.device = torch.device(device) if device is not None else next(head.parameters()).device
        configure_threads()  # CPU rendering: torch threads = CPUs this process may use
        self.head = head.to(self.device).eval()
        self.torso = torso.to(self.device).eval() if torso is not None else None
        self.size = int(size)
        self.intrinsics = intrinsics
        self.head_scale = float(head_scale)
        self.window = int(window)
        self.n_samples = int(n_samples)
        # rays per field call: small on CPU (cache-friendly), large on a GPU (fewer launches per frame)
        self.chunk = int(chunk) if chunk else (CHUNK_CUDA if self.device.type == "cuda" else CHUNK_CPU)
        self._background: torch.Tensor | None = self.torso.background.clone() if self.torso is not None else None

    def compile(self, **kwargs) -> None:
        """``torch.compile`` the head field's and the torso field's ``forward`` / ``density`` (MLPs fused by
        Inductor; the hash grid stays as it is when its backend is an extension). Opt-in: the first
        renders pay the compilation (tens of seconds); shapes vary with the number of samples, hence
        ``dynamic=True``. ``kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).
        State-dict keys are unchanged."""
        kwargs.setdefault("dynamic", True)
        f = self.head.field
        f.forward = torch.compile(f.forward, **kwargs)
        f.density = torch.compile(f.density, **kwargs)
        if self.torso is not None:
            self.torso.field.forward = torch.compile(self.torso.field.forward, **kwargs)

    def set_background(self, background) -> None:
        """Default background plate: uint8 [S, S, 3] (numpy or tensor, any S; resized as needed)."""
        self._background = self._as_image(background)

    def _as_image(self, img) -> torch.Tensor:
        t = torch.as_tensor(np.array(img) if not torch.is_tensor(img) else img)  # a copy: memmaps are read-only
        if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[-1] != 3:
            raise InvalidInput(f"background must be uint8 [S, S, 3], got {tuple(t.shape)} {t.dtype}")
        return t.to(self.device)

    def _background_at(self, size: int, background) -> torch.Tensor:
        bg = self._as_image(background) if background is not None else self._background
        if bg is None:
            return torch.zeros(size, size, 3, device=self.device)
        bg = bg.float().div(255)
        if bg.shape[0] != size or bg.shape[1] != size:
            bg = torch.nn.functional.interpolate(
                bg.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )[0].permute(1, 2, 0)
        return bg

    @torch.no_grad()
    def render(
        self,
        lm3d_window: torch.Tensor,
        pose: torch.Tensor,
        blink: torch.Tensor | None = None,
        background=None,
        size: int | None = None,
    ) -> torch.Tensor:
        """Render composited frames (background plate -> torso -> head).

        Batched: the head rays of all B frames (pixels inside each frame's projected head box) go
        through the field in chunks of ``chunk`` rays regardless of frame boundaries, and the torso
        is evaluated on the pixels of the person box (``TorsoNerf.person_box``) of all B frames
        likewise; the head boxes are computed on the device (one ``nonzero`` per call, no
        per-frame host synchronisation). Output pixels do not depend on B.

        Args:
            lm3d_window: float32 [B, W, 68, 3] canonical landmarks, a W-frame window centred on each
                frame (W = ``self.window``; the attention smoothing input).
            pose: float32 [B, 4, 4] head-to-camera transforms (metres, OpenCV camera axes).
            blink: float32 [B] eye aspect ratio of each frame, or None (the training mean).
            background: uint8 [S', S', 3] plate for these frames, or None (the stored/set plate).
            size: output side in pixels (intrinsics scaled from the training size); default ``self.size``.

        Returns:
            uint8 [B, size, size, 3] RGB on ``self.device``.

        Raises:
            InvalidInput: wrong shapes.
        """
        size = int(size or self.size)
        head_rgb, head_acc, all_pix, pose = self._head_pass(lm3d_window, pose, blink, size)
        B, P = head_acc.shape
        dev = self.device
        bg = self._background_at(size, background).reshape(-1, 3)  # [S*S, 3]
        rgb = composite(bg.expand(B, P, 3).reshape(-1, 3), head_rgb.reshape(-1, 3), head_acc.reshape(-1)).view(B, P, 3)

        # torso: only inside the person box (outside it the torso is transparent by training)
        if self.torso is not None:
            tf = self.torso.field
            x0, y0, x1, y1 = self._person_box_px(size)
            if x1 > x0 and y1 > y0:
                box = (all_pix[:, 0] >= x0) & (all_pix[:, 0] < x1) & (all_pix[:, 1] >= y0) & (all_pix[:, 1] < y1)
                pidx = box.nonzero().squeeze(1)  # [Pb] (static per size)
                flat_t = (torch.arange(B, device=dev)[:, None] * P + pidx[None]).reshape(-1)  # [B*Pb]
                hr, ha = head_rgb.reshape(-1, 3), head_acc.reshape(-1)
                out_rgb = rgb.reshape(-1, 3)
                for i in range(0, flat_t.numel(), 4 * self.chunk):
                    sel = flat_t[i : i + 4 * self.chunk]
                    bi = torch.div(sel, P, rounding_mode="floor")
                    p = sel - bi * P
                    n = sel.numel()
                    uv = (all_pix[p].float() + 0.5) / size
                    alpha, trgb = tf(uv, pose[bi], tf.individual_code(None, n), torch.cat((hr[sel], ha[sel, None]), -1))
                    out_rgb[sel] = composite(bg[p], hr[sel], ha[sel], trgb.float(), alpha.float())
        return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).view(B, size, size, 3)

    @torch.no_grad()
    def head_alpha(
        self, lm3d_window: torch.Tensor, pose: torch.Tensor, blink: torch.Tensor | None = None, size: int | None = None
    ) -> torch.Tensor:
        """Accumulated opacity of the head NeRF alone (what is composited over torso and plate).

        Same inputs as :meth:`render`. Returns float32 [B, size, size] in [0, 1] on ``self.device``
        (0 outside the projected head box). Used to check that the head is opaque on the tracked
        head mask and transparent elsewhere (no semi-transparent band above the hair, issue 18).

        Raises:
            InvalidInput: wrong shapes.
        """
        size = int(size or self.size)
        _, acc, _, _ = self._head_pass(lm3d_window, pose, blink, size)
        return acc.view(-1, size, size)

    def _head_pass(self, lm3d_window, pose, blink, size: int):
        """Head rays of all B frames: (premultiplied rgb [B, P, 3], acc [B, P], pixel grid [P, 2], pose)."""
        lm3d_window = torch.as_tensor(lm3d_window, dtype=torch.float32, device=self.device)
        pose = torch.as_tensor(pose, dtype=torch.float32, device=self.device)
        if lm3d_window.dim() != 4 or lm3d_window.shape[2:] != (68, 3) or pose.shape != (lm3d_window.shape[0], 4, 4):
            raise InvalidInput(
                f"render expects lm3d_window [B, W, 68, 3] and pose [B, 4, 4], got "
                f"{tuple(lm3d_window.shape)} and {tuple(pose.shape)}"
            )
        if size < 8:
            raise InvalidInput(f"render size must be >= 8 pixels, got {size}")
        B, W = lm3d_window.shape[:2]
        s = size / self.size
        K = Intrinsics(self.intrinsics.fx * s, self.intrinsics.fy * s, self.intrinsics.cx * s, self.intrinsics.cy * s)
        field = self.head.field
        dev = self.device
        blink_w = None
        if field.cfg.use_blink and blink is not None:
            blink_w = torch.as_tensor(blink, dtype=torch.float32, device=dev).reshape(B, 1).expand(B, W)
        cond = field.cond_net(lm3d_window, blink_w)  # [B, cond_dim]
        P = size * size
        ys, xs = torch.meshgrid(torch.arange(size, device=dev), torch.arange(size, device=dev), indexing="ij")
        all_pix = torch.stack((xs, ys), -1).reshape(-1, 2)  # [S*S, 2] (x, y)

        # head: every pixel inside the projected head box of its frame, all B frames in one pass
        # (boxes computed on the device; one nonzero() for the batch, no per-frame host sync)
        bounds = box_pixel_bounds_batch(field.aabb, pose, K, self.head_scale, size)  # [B, 4]
        ax = torch.arange(size, device=dev)
        in_x = (ax[None] >= bounds[:, 0:1]) & (ax[None] < bounds[:, 2:3])  # [B, S]
        in_y = (ax[None] >= bounds[:, 1:2]) & (ax[None] < bounds[:, 3:4])  # [B, S]
        flat = (in_y[:, :, None] & in_x[:, None, :]).reshape(-1).nonzero().squeeze(1)  # [R] index b*P + p
        head_rgb = torch.zeros(B * P, 3, device=dev)
        head_acc = torch.zeros(B * P, device=dev)
        c2w = torch.linalg.inv(pose)  # [B, 4, 4]
        for i in range(0, flat.numel(), self.chunk):
            sel = flat[i : i + self.chunk]
            bi = torch.div(sel, P, rounding_mode="floor")
            o, d = camera_rays(all_pix[sel - bi * P].float(), K, c2w[bi], self.head_scale)
            n = sel.numel()
            r = render_head_rays(
                field,
                self.head.estimator,
                o,
                d,
                cond[bi],
                field.individual_code(None, n),
                self.n_samples,
                amp=True,
            )  # CUDA: nerfacc + bf16
            head_rgb[sel] = r["rgb"].float()
            head_acc[sel] = r["acc"].float()
        head_rgb, head_acc = head_rgb.view(B, P, 3), head_acc.view(B, P)
        return head_rgb, head_acc, all_pix, pose

    def _person_box_px(self, size: int) -> tuple[int, int, int, int]:
        """The torso's person box in pixels of a ``size`` frame (host ints; cached per size)."""
        cache = self.__dict__.setdefault("_person_box_cache", {})
        if size not in cache:
            b = self.torso.person_box.detach().float().cpu().tolist()
            cache[size] = (
                max(0, math.floor(b[0] * size)),
                max(0, math.floor(b[1] * size)),
                min(size, math.ceil(b[2] * size)),
                min(size, math.ceil(b[3] * size)),
            )
        return cache[size]


def load_nerf(path: str | Path, device: str | torch.device | None = None, n_samples: int | None = None) -> AvatarNerf:
    """Load ``path/head`` (required) and ``path/torso`` (optional) written by ``avatar train-nerf``.

    Args:
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        n_samples: samples per head ray (default: the training value).

    Raises:
        BundleCorrupt: missing/unreadable head model.
    """
    path = Path(path)
    if not (path / "head").is_dir():
        raise BundleCorrupt(f"{path} has no head/ NeRF; train one with `avatar train-nerf DATASET --out {path}`")
    dev = resolve_device(device)
    head, info = load_head(path / "head", dev)
    torso = None
    if (path / "torso" / "metrics.json").is_file():  # written last: the part is complete
        torso, _ = load_torso(path / "torso", dev)
    else:
        log.warning("%s: no torso NeRF; rendering the head over the background plate", path)
    k = info["intrinsics"]
    cfg_samples = info["config"]["train"]["n_samples"]
    return AvatarNerf(
        head,
        torso,
        info["size"],
        Intrinsics(**k),
        info["head_scale"],
        info["window"],
        dev,
        n_samples=n_samples or cfg_samples,
    )


__all__ = ["AvatarNerf", "load_nerf"]
