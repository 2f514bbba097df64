"""Inference API: ``load_nerf(dir) -> AvatarNerf`` renders composited frames from landmarks + pose."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from avatar.data.dataset import Intrinsics
from avatar.errors import BundleCorrupt, InvalidInput
from avatar.nerf.model import HeadNerf, TorsoNerf, load_head, load_torso
from avatar.nerf.rays import box_pixel_bounds, camera_rays
from avatar.nerf.render import composite, render_head_rays
from avatar.runtime import configure_threads

log = logging.getLogger(__name__)


class AvatarNerf:
    """Head (+ torso) NeRF of one person, ready to render.

    Attributes:
        size: native frame side (pixels) the models were trained at.
        intrinsics: :class:`Intrinsics` at ``size``.
        window: W, frames of landmarks the condition attention smooths over (centred window).
        head_scale: metres per canonical landmark unit.
    """

    def __init__(self, head: HeadNerf, torso: TorsoNerf | None, size: int, intrinsics: Intrinsics,
                 head_scale: float, window: int, device: torch.device | str | None = None,
                 n_samples: int = 32, chunk: int = 8192):
        self.device = torch.device(device) if device is not None else next(head.parameters()).device
        configure_threads()  # CPU rendering: torch threads = CPUs this process may use
        self.head = head.to(self.device).eval()
        self.torso = torso.to(self.device).eval() if torso is not None else None
        self.size = int(size)
        self.intrinsics = intrinsics
        self.head_scale = float(head_scale)
        self.window = int(window)
        self.n_samples = int(n_samples)
        self.chunk = int(chunk)
        self._background: torch.Tensor | None = (self.torso.background.clone() if self.torso is not None else None)

    def set_background(self, background) -> None:
        """Default background plate: uint8 [S, S, 3] (numpy or tensor, any S; resized as needed)."""
        self._background = self._as_image(background)

    def _as_image(self, img) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(img) if not torch.is_tensor(img) else img)
        if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[-1] != 3:
            raise InvalidInput(f"background must be uint8 [S, S, 3], got {tuple(t.shape)} {t.dtype}")
        return t.to(self.device)

    def _background_at(self, size: int, background) -> torch.Tensor:
        bg = self._as_image(background) if background is not None else self._background
        if bg is None:
            return torch.zeros(size, size, 3, device=self.device)
        bg = bg.float().div(255)
        if bg.shape[0] != size or bg.shape[1] != size:
            bg = torch.nn.functional.interpolate(bg.permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)[0].permute(1, 2, 0)
        return bg

    @torch.no_grad()
    def render(self, lm3d_window: torch.Tensor, pose: torch.Tensor, blink: torch.Tensor | None = None,
               background=None, size: int | None = None) -> torch.Tensor:
        """Render composited frames (background plate -> torso -> head).

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
        lm3d_window = torch.as_tensor(lm3d_window, dtype=torch.float32, device=self.device)
        pose = torch.as_tensor(pose, dtype=torch.float32, device=self.device)
        if lm3d_window.dim() != 4 or lm3d_window.shape[2:] != (68, 3) or pose.shape != (lm3d_window.shape[0], 4, 4):
            raise InvalidInput(f"render expects lm3d_window [B, W, 68, 3] and pose [B, 4, 4], got "
                               f"{tuple(lm3d_window.shape)} and {tuple(pose.shape)}")
        if size < 8:
            raise InvalidInput(f"render size must be >= 8 pixels, got {size}")
        B, W = lm3d_window.shape[:2]
        s = size / self.size
        K = Intrinsics(self.intrinsics.fx * s, self.intrinsics.fy * s, self.intrinsics.cx * s, self.intrinsics.cy * s)
        field = self.head.field
        blink_w = None
        if field.cfg.use_blink and blink is not None:
            blink_w = torch.as_tensor(blink, dtype=torch.float32, device=self.device).reshape(B, 1).expand(B, W)
        cond = field.cond_net(lm3d_window, blink_w)
        bg = self._background_at(size, background)
        ys, xs = torch.meshgrid(torch.arange(size, device=self.device), torch.arange(size, device=self.device), indexing="ij")
        all_pix = torch.stack((xs, ys), -1).reshape(-1, 2)
        out = torch.empty(B, size, size, 3, dtype=torch.uint8, device=self.device)
        for b in range(B):
            head_rgb = torch.zeros(size * size, 3, device=self.device)
            head_acc = torch.zeros(size * size, device=self.device)
            x0, y0, x1, y1 = box_pixel_bounds(field.aabb, pose[b].cpu(), K, self.head_scale, size)
            if x1 > x0 and y1 > y0:
                sub = (all_pix[:, 0] >= x0) & (all_pix[:, 0] < x1) & (all_pix[:, 1] >= y0) & (all_pix[:, 1] < y1)
                idx = sub.nonzero().squeeze(1)
                c2w = torch.linalg.inv(pose[b])
                for i in range(0, len(idx), self.chunk):
                    sel = idx[i : i + self.chunk]
                    o, d = camera_rays(all_pix[sel].float(), K, c2w, self.head_scale)
                    n = len(sel)
                    r = render_head_rays(field, self.head.occ, o, d, cond[b].expand(n, -1),
                                         field.individual_code(None, n), self.n_samples,
                                         estimator=self.head.estimator, amp=True)  # CUDA: nerfacc + bf16
                    head_rgb[sel] = r["rgb"].float()
                    head_acc[sel] = r["acc"].float()
            flat_bg = bg.reshape(-1, 3)
            if self.torso is not None:
                tf = self.torso.field
                rgb = torch.empty(size * size, 3, device=self.device)
                for i in range(0, size * size, 4 * self.chunk):
                    sl = slice(i, i + 4 * self.chunk)
                    n = all_pix[sl].shape[0]
                    uv = (all_pix[sl].float() + 0.5) / size
                    alpha, trgb = tf(uv, pose[b].expand(n, 4, 4), tf.individual_code(None, n),
                                     torch.cat((head_rgb[sl], head_acc[sl, None]), -1))
                    rgb[sl] = composite(flat_bg[sl], head_rgb[sl], head_acc[sl], trgb.float(), alpha.float())
            else:
                rgb = composite(flat_bg, head_rgb, head_acc)
            out[b] = (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).reshape(size, size, 3)
        return out


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
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head, info = load_head(path / "head", dev)
    torso = None
    if (path / "torso" / "metrics.json").is_file():  # written last: the part is complete
        torso, _ = load_torso(path / "torso", dev)
    else:
        log.warning("%s: no torso NeRF; rendering the head over the background plate", path)
    k = info["intrinsics"]
    cfg_samples = info["config"]["train"]["n_samples"]
    return AvatarNerf(head, torso, info["size"], Intrinsics(**k), info["head_scale"], info["window"], dev,
                      n_samples=n_samples or cfg_samples)


__all__ = ["AvatarNerf", "load_nerf"]
