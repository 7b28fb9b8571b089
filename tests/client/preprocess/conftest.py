"""Fixtures of the preprocessing tests: phantoms and a tiny site built with SimpleITK in tmp_path.

The tiny site has 2 patients (P001, P007) x timepoints pre, post x sequences t2w, dwi. T2W volumes
are 32x32x6 at 1 x 1 x 4 mm, DWI 16x16x6 at 2 x 2 x 4 mm over the same physical field of view.
Each volume carries a smooth multiplicative bias field and an ellipsoidal bright tumour whose
largest axial slice is known (``TUMOUR_Z[pid][tp]``); every volume has its own mask unless a test
removes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from shared.config import RectalFLConfig, parse_config

PATIENTS = ("P001", "P007")
TIMEPOINTS = ("pre", "post")
SEQUENCES = ("t2w", "dwi")
GRIDS: dict[str, dict[str, Any]] = {
    "t2w": {"size": (32, 32, 6), "spacing": (1.0, 1.0, 4.0)},
    "dwi": {"size": (16, 16, 6), "spacing": (2.0, 2.0, 4.0)},
}
ORIGIN = (-16.0, -16.0, 0.0)
# largest tumour slice (z index) per patient and timepoint, and the tumour centre (x, y) in mm
TUMOUR_Z = {"P001": {"pre": 2, "post": 3}, "P007": {"pre": 4, "post": 1}}
TUMOUR_XY = {"P001": (4.0, -3.0), "P007": (-5.0, 6.0)}


def smooth_bias(shape_zyx: tuple[int, ...], strength: float = 0.3) -> np.ndarray:
    """A smooth multiplicative field: 1 + strength * (linear in x + quadratic in y + linear in z)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    return 1.0 + strength * x + (2 / 3) * strength * y**2 - (1 / 3) * strength * z


def phantom(shape_zyx: tuple[int, int, int] = (10, 64, 64), spacing: tuple[float, float, float] = (0.8, 0.8, 3.0),
            *, bias_strength: float = 0.3, noise: float = 1.5, seed: int = 0
            ) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """A piecewise-homogeneous pelvis-like phantom times a known smooth bias field.

    Returns the biased image, a boolean (z, y, x) region of homogeneous "muscle" (100) well inside
    its compartment, and the bias field.
    """
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    inner = (x / 0.4) ** 2 + ((y + 0.1) / 0.35) ** 2 < 1
    spot = (x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.1**2
    arr = np.where(body, 100.0, 0.0)
    arr[inner] = 160.0
    arr[spot & body] = 60.0
    region = ((x / 0.75) ** 2 + (y / 0.6) ** 2 < 1) & ~((x / 0.5) ** 2 + ((y + 0.1) / 0.45) ** 2 < 1)
    region &= ~((x - 0.3) ** 2 + (y - 0.3) ** 2 < 0.18**2)
    bias = smooth_bias(shape_zyx, bias_strength)
    rng = np.random.default_rng(seed)
    img = np.clip(arr * bias + rng.normal(0, noise, arr.shape) * body, 0, None).astype(np.float32)
    im = sitk.GetImageFromArray(img)
    im.SetSpacing(spacing)
    return im, region, bias


def tumour_arrays(seq: str, z_max: int, centre_xy: tuple[float, float], seed: int = 0,
                  size: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) arrays (z, y, x) on ``seq``'s grid: body + bright ellipsoidal tumour, biased."""
    g = size or GRIDS[seq]
    nx, ny, nz = g["size"]
    sx, sy, _ = g["spacing"]
    # physical centres of the voxels
    xs = ORIGIN[0] + sx * np.arange(nx)
    ys = ORIGIN[1] + sy * np.arange(ny)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    mask = np.zeros((nz, ny, nx), np.uint8)
    for k in range(nz):
        r = 7.0 - 2.0 * abs(k - z_max)  # radius in mm, largest at z_max
        if r > 0:
            mask[k] = ((xx - centre_xy[0]) ** 2 + (yy - centre_xy[1]) ** 2) <= r**2
    rng = np.random.default_rng(seed)
    body = ((xx / 15.0) ** 2 + (yy / 13.0) ** 2 < 1)[None].repeat(nz, 0)
    arr = np.where(body, 100.0, 5.0) + 80.0 * mask
    arr = arr * smooth_bias(arr.shape, 0.25) + rng.normal(0, 2.0, arr.shape)
    return np.clip(arr, 0, None).astype(np.float32), mask


def to_image(arr: np.ndarray, seq: str, **override: Any) -> sitk.Image:
    g = {**GRIDS[seq], "origin": ORIGIN, **override}
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(g["spacing"])
    img.SetOrigin(g["origin"])
    if "direction" in g:
        img.SetDirection(g["direction"])
    return img


@dataclass
class Site:
    root: Path

    def path(self, pid: str, tp: str, seq: str, kind: str = "image") -> Path:
        return self.root / ("images" if kind == "image" else "masks") / pid / tp / f"{seq}.nii.gz"

    def write(self, img: sitk.Image, pid: str, tp: str, seq: str, kind: str = "image") -> Path:
        p = self.path(pid, tp, seq, kind)
        p.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(p))
        return p

    def remove_mask(self, pid: str, tp: str, seq: str) -> None:
        self.path(pid, tp, seq, "mask").unlink()


def build_site(root: Path, patients: tuple[str, ...] = PATIENTS) -> Site:
    site = Site(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = [f"{pid},{i % 2}" for i, pid in enumerate(patients)]
    (root / "patients.csv").write_text("patient_id,response\n" + "\n".join(rows) + "\n")
    for i, pid in enumerate(patients):
        for j, tp in enumerate(TIMEPOINTS):
            zc = TUMOUR_Z.get(pid, {"pre": 2, "post": 3})[tp]
            cxy = TUMOUR_XY.get(pid, (0.0, 0.0))
            for seq in SEQUENCES:
                arr, mask = tumour_arrays(seq, zc, cxy, seed=10 * i + j)
                site.write(to_image(arr, seq), pid, tp, seq)
                site.write(to_image(mask, seq), pid, tp, seq, "mask")
    return site


def site_config(**preprocess: Any) -> RectalFLConfig:
    pp = {"n4": {"enabled": True, "shrink_factor": 2, "iterations": [10]}, "slice_size": 24, "min_crop_mm": 16.0,
          "bins": 32, "workers": 1}
    pp.update(preprocess)
    return parse_config({"data": {"sequences": list(SEQUENCES), "timepoints": list(TIMEPOINTS)}, "preprocess": pp})


@pytest.fixture
def tiny_site(tmp_path: Path) -> Site:
    return build_site(tmp_path / "site")


@pytest.fixture
def cfg() -> RectalFLConfig:
    return site_config()
