"""Synthetic banana-detection data in the layout of the D2L banana dataset.

Layout written under ``root`` (e.g. ``<data_dir>/banana-synthetic``)::

    root/
      synthetic.json                 # generator parameters (seed, counts, size, version)
      bananas_train/label.csv        # img_name,label,xmin,ymin,xmax,ymax (int pixels)
      bananas_train/images/0.png ... # RGB PNG, image_size x image_size
      bananas_val/label.csv
      bananas_val/images/0.png ...

Each image holds exactly one banana: a curved, tapered yellow band (an arc of random length,
curvature, thickness, rotation and shading) with a dark tip and a brownish stem, drawn over a
textured background (gradients, low-frequency colour noise, random shapes, pixel noise) that
also contains yellow-ish distractor blobs (round / elliptic / irregular, never banana-shaped).
The box is the tight box of the banana's drawn pixels in pixel-edge coordinates:
``xmin`` = first column, ``xmax`` = last column + 1 (same for rows), so ``0 <= xmin < xmax <=
image_size``. Generation is deterministic given ``seed`` (each image has its own random stream
``(seed, split, index)``, so a small set is a prefix of a larger one with the same seed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS: dict[str, int] = {"bananas_train": 0, "bananas_val": 1}
META_FILE = "synthetic.json"


def _random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, ...]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _yellowish(rng: np.random.Generator) -> tuple[int, int, int]:
    return (
        int(rng.integers(200, 256)),
        int(rng.integers(165, 235)),
        int(rng.integers(0, 90)),
    )


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradient and/or low-frequency colour noise, as an RGB image."""
    kind = int(rng.integers(0, 3))
    coords = np.arange(size, dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    proj = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
    proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    c1 = np.array(_random_colour(rng), dtype=np.float32)
    c2 = np.array(_random_colour(rng), dtype=np.float32)
    gradient = c1 + (c2 - c1) * proj[..., None]
    cells = int(rng.integers(2, 9))
    coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    noise = np.asarray(
        Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC),
        dtype=np.float32,
    )
    mix = (0.0, 1.0, rng.uniform(0.3, 0.7))[kind]
    out = gradient * (1.0 - mix) + noise * mix
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


def _random_shapes(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Clutter: rectangles, ellipses, lines and triangles in random (mostly dull) colours."""
    for _ in range(int(rng.integers(4, 20))):
        kind = int(rng.integers(0, 4))
        x0, y0 = rng.uniform(-0.1 * size, 1.1 * size, size=2)
        w, h = rng.uniform(0.03 * size, 0.35 * size, size=2)
        colour = _random_colour(rng, 0, 200)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 2:
            x1, y1 = rng.uniform(0, size, size=2)
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 6)))
        else:
            pts = rng.uniform(-0.5, 0.5, size=(3, 2)) * (w, h) + (x0, y0)
            draw.polygon([tuple(p) for p in pts], fill=colour)


def _distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Yellow-ish blobs that are not banana-shaped (convex-ish, aspect ratio <= 2)."""
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 3))
        r = rng.uniform(0.04, 0.14) * size
        cx, cy = rng.uniform(0, size, size=2)
        colour = _yellowish(rng)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            ratio = rng.uniform(1.0, 2.0)
            draw.ellipse([cx - r * ratio, cy - r, cx + r * ratio, cy + r], fill=colour)
        else:
            n = int(rng.integers(6, 11))
            ang = np.sort(rng.uniform(0, 2 * math.pi, size=n))
            rad = r * rng.uniform(0.6, 1.0, size=n)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
            draw.polygon([tuple(p) for p in pts], fill=colour)


def _banana_outline(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sample a banana: returns ``(outer[n, 2], inner[n, 2], n)`` polygon halves in pixels.

    The centre line is a circular arc of length ``L`` and angle ``phi``; the thickness tapers to
    the tips; the shape is randomly rotated and placed fully inside the image.
    """
    n = 32
    length = rng.uniform(0.18, 0.55) * size
    phi = rng.uniform(0.5, 1.8)
    radius = length / phi
    width = length * rng.uniform(0.16, 0.28)
    s = np.linspace(0.0, 1.0, n)
    theta = -phi / 2.0 + phi * s
    centre = np.stack([radius * np.sin(theta), radius - radius * np.cos(theta)], axis=1)
    radial = np.stack([np.sin(theta), -np.cos(theta)], axis=1)
    thick = np.maximum(width * np.sin(np.pi * s) ** 0.6, 2.0)
    outer = centre + radial * (thick[:, None] / 2.0)
    inner = centre - radial * (thick[:, None] / 2.0)
    alpha = rng.uniform(0.0, 2.0 * math.pi)
    rot = np.array([[math.cos(alpha), -math.sin(alpha)], [math.sin(alpha), math.cos(alpha)]])
    outer, inner = outer @ rot.T, inner @ rot.T
    pts = np.concatenate([outer, inner])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = hi - lo
    if (span > size - 4).any():  # too big for the canvas: shrink about the centre
        factor = (size - 4) / span.max()
        outer, inner, lo, hi = outer * factor, inner * factor, lo * factor, hi * factor
    shift = np.array(
        [rng.uniform(1 - lo[0], size - 1 - hi[0]), rng.uniform(1 - lo[1], size - 1 - hi[1])]
    )
    if rng.random() < 0.5:  # which end carries the stem
        outer, inner = outer[::-1], inner[::-1]
    return outer + shift, inner + shift, n


def _draw_banana(
    rng_params: dict, canvas: np.ndarray, size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Composite the banana described by ``rng_params`` onto ``canvas`` (returns a new array)."""
    outer, inner, n = rng_params["outer"], rng_params["inner"], rng_params["n"]
    band = [tuple(p) for p in np.concatenate([outer, inner[::-1]])]
    mask_img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_img).polygon(band, fill=255)
    mask = np.asarray(mask_img) > 0

    colour_img = Image.new("RGB", (size, size), rng_params["base"])
    draw = ImageDraw.Draw(colour_img)
    hl = rng_params["highlight_frac"]
    highlight = np.concatenate([outer, (outer * (1 - hl) + inner * hl)[::-1]])
    draw.polygon([tuple(p) for p in highlight], fill=rng_params["light"])
    k_tip = max(2, int(round(n * rng_params["tip_frac"])))
    k_stem = max(2, int(round(n * rng_params["stem_frac"])))
    tip = np.concatenate([outer[:k_tip], inner[:k_tip][::-1]])
    stem = np.concatenate([outer[n - k_stem :], inner[n - k_stem :][::-1]])
    draw.polygon([tuple(p) for p in tip], fill=rng_params["tip"])
    draw.polygon([tuple(p) for p in stem], fill=rng_params["stem"])
    draw.polygon(band, outline=rng_params["edge"], width=1)

    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    colour = np.asarray(colour_img, dtype=np.float32)[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    direction = rng_params["shade_dir"]
    proj = xx * math.cos(direction) + yy * math.sin(direction)
    proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    shade = rng_params["shade_lo"] + (rng_params["shade_hi"] - rng_params["shade_lo"]) * proj
    shaded = np.clip(colour * shade[..., None], 0, 255)
    out = canvas.copy()
    region = out[y0:y1, x0:x1]
    sub_mask = mask[y0:y1, x0:x1]
    region[sub_mask] = shaded[sub_mask]
    return out, (int(x0), int(y0), int(x1), int(y1))


def render_sample(
    rng: np.random.Generator, size: int = 256, draw_banana: bool = True
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Render one synthetic image.

    All random parameters are drawn before rendering, so ``draw_banana=False`` yields the very
    same scene without the banana (used by tests to verify box tightness independently).

    Args:
        rng: random generator (consumed).
        size: image side in pixels.
        draw_banana: whether to paint the banana.

    Returns:
        ``(image uint8 [size, size, 3], box (xmin, ymin, xmax, ymax))``: the tight pixel-edge
        box of the banana's pixels (computed even when it is not drawn).
    """
    background = _background(rng, size)
    draw = ImageDraw.Draw(background)
    _random_shapes(rng, draw, size)
    _distractors(rng, draw, size)
    outer, inner, n = _banana_outline(rng, size)
    base = _yellowish(rng)
    params = {
        "outer": outer,
        "inner": inner,
        "n": n,
        "base": base,
        "light": tuple(min(255, c + 35) for c in base),
        "tip": _random_colour(rng, 20, 70),
        "stem": (int(rng.integers(70, 130)), int(rng.integers(80, 140)), int(rng.integers(10, 50))),
        "edge": tuple(int(c * 0.7) for c in base),
        "tip_frac": rng.uniform(0.04, 0.09),
        "stem_frac": rng.uniform(0.06, 0.12),
        "highlight_frac": rng.uniform(0.2, 0.45),
        "shade_dir": rng.uniform(0, 2 * math.pi),
        "shade_lo": rng.uniform(0.6, 0.9),
        "shade_hi": rng.uniform(1.0, 1.15),
    }
    sigma = rng.uniform(0.0, 8.0)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * sigma
    canvas = np.asarray(background, dtype=np.uint8)
    banana_canvas, box = _draw_banana(params, canvas, size)
    if draw_banana:
        canvas = banana_canvas
    image = np.clip(canvas.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, box


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split`` (``"bananas_train"``/``"bananas_val"``)."""
    return np.random.default_rng([seed, SPLITS[split], index])


def _write_split(split_dir: Path, split: str, count: int, seed: int, size: int) -> None:
    images_dir = split_dir / "images"
    images_dir.mkdir(parents=True)
    rows = []
    for i in range(count):
        image, box = render_sample(sample_rng(seed, split, i), size)
        name = f"{i}.png"
        Image.fromarray(image, "RGB").save(images_dir / name, compress_level=1)
        rows.append((name, 0, *box))
    with open(split_dir / "label.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["img_name", "label", "xmin", "ymin", "xmax", "ymax"])
        writer.writerows(rows)


def _meta(num_train: int, num_val: int, seed: int, size: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "seed": seed,
        "image_size": size,
    }


def synthetic_is_current(
    root: str | os.PathLike[str], num_train: int, num_val: int, seed: int, image_size: int = 256
) -> bool:
    """Whether ``root`` holds a complete synthetic set generated with these parameters."""
    root = Path(root)
    try:
        meta = json.loads((root / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    complete = all((root / split / "label.csv").is_file() for split in SPLITS)
    return complete and meta == _meta(num_train, num_val, seed, image_size)


def generate_banana_dataset(
    root: str | os.PathLike[str],
    num_train: int = 1000,
    num_val: int = 100,
    seed: int = 0,
    image_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic banana dataset to ``root`` atomically.

    The data is generated in a temporary directory next to ``root`` and renamed into place; an
    existing ``root`` generated with the same parameters is reused unless ``overwrite``, a stale
    one (other parameters or incomplete) is replaced.

    Args:
        root: destination directory (e.g. ``<data_dir>/banana-synthetic``).
        num_train: number of training images (>= 1).
        num_val: number of validation images (>= 1).
        seed: random seed.
        image_size: image side in pixels (>= 32).
        overwrite: regenerate even if an up-to-date copy exists.

    Returns:
        ``root``.

    Raises:
        ValueError: invalid counts or size.
        FileExistsError: ``root`` is a non-empty directory that this generator did not write.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(
            "data.num_synthetic_train and data.num_synthetic_val must be >= 1, "
            f"got {num_train} and {num_val}"
        )
    if image_size < 32:
        raise ValueError(f"synthetic image_size must be >= 32, got {image_size}")
    root = Path(root)
    if not overwrite and synthetic_is_current(root, num_train, num_val, seed, image_size):
        return root
    if root.exists() and not (root / META_FILE).exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and is not a synthetic banana set (no {META_FILE}); refusing to "
            "replace it. Remove it or generate into another directory"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-tmp-", dir=root.parent))
    trash: Path | None = None
    try:
        logger.info(
            "Generating synthetic banana data (%d train / %d val, seed %d) in %s",
            num_train,
            num_val,
            seed,
            root,
        )
        _write_split(tmp / "bananas_train", "bananas_train", num_train, seed, image_size)
        _write_split(tmp / "bananas_val", "bananas_val", num_val, seed, image_size)
        (tmp / META_FILE).write_text(
            json.dumps(_meta(num_train, num_val, seed, image_size), indent=2)
        )
        if root.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            os.rename(root, trash / root.name)
        os.rename(tmp, root)
        tmp = None  # type: ignore[assignment]
        return root
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
