"""Tests for the synthetic banana generator (src.data.synthetic)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.synthetic import (
    generate_banana_dataset,
    render_sample,
    sample_rng,
    synthetic_is_current,
)

N_TRAIN, N_VAL = 8, 4


def _rows(split_dir: Path) -> list[dict[str, str]]:
    with open(split_dir / "label.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "banana-synthetic"
    generate_banana_dataset(root, num_train=N_TRAIN, num_val=N_VAL, seed=3)
    return root


def test_layout(generated: Path) -> None:
    assert sorted(os.listdir(generated.parent)) == ["banana-synthetic"]  # no temp dirs left
    assert sorted(os.listdir(generated)) == ["bananas_train", "bananas_val", "synthetic.json"]
    meta = json.loads((generated / "synthetic.json").read_text())
    assert meta["num_train"] == N_TRAIN and meta["num_val"] == N_VAL and meta["seed"] == 3
    for split, count in (("bananas_train", N_TRAIN), ("bananas_val", N_VAL)):
        split_dir = generated / split
        header = (split_dir / "label.csv").read_text().splitlines()[0]
        assert header == "img_name,label,xmin,ymin,xmax,ymax"
        rows = _rows(split_dir)
        assert [r["img_name"] for r in rows] == [f"{i}.png" for i in range(count)]
        assert {r["label"] for r in rows} == {"0"}
        assert len(os.listdir(split_dir / "images")) == count
        for r in rows:
            with Image.open(split_dir / "images" / r["img_name"]) as img:
                assert img.mode == "RGB" and img.size == (256, 256)
            xmin, ymin, xmax, ymax = (int(r[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 0 <= xmin < xmax <= 256 and 0 <= ymin < ymax <= 256
            assert xmax - xmin >= 8 and ymax - ymin >= 8


def test_boxes_are_tight_around_the_banana_pixels(generated: Path) -> None:
    """Re-render each scene without the banana: the changed pixels are exactly the box."""
    for split, count in (("bananas_train", N_TRAIN), ("bananas_val", N_VAL)):
        for i, row in enumerate(_rows(generated / split)):
            assert i < count
            saved = np.asarray(Image.open(generated / split / "images" / row["img_name"]))
            with_banana, box = render_sample(sample_rng(3, split, i))
            without, _ = render_sample(sample_rng(3, split, i), draw_banana=False)
            np.testing.assert_array_equal(saved, with_banana)  # PNG is lossless
            rows, cols = np.nonzero((with_banana != without).any(axis=2))
            changed = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            written = tuple(int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert written == box
            # pixels the banana did not change (same colour as the background) can only
            # shrink the changed region; allow one pixel for that
            assert np.abs(np.subtract(changed, written)).max() <= 1, (split, i)


def test_deterministic_by_seed(tmp_path: Path, generated: Path) -> None:
    again = generate_banana_dataset(tmp_path / "a", num_train=N_TRAIN, num_val=N_VAL, seed=3)
    other = generate_banana_dataset(tmp_path / "b", num_train=N_TRAIN, num_val=N_VAL, seed=4)
    for split in ("bananas_train", "bananas_val"):
        assert (again / split / "label.csv").read_bytes() == (
            generated / split / "label.csv"
        ).read_bytes()
        a = np.asarray(Image.open(again / split / "images" / "1.png"))
        b = np.asarray(Image.open(generated / split / "images" / "1.png"))
        c = np.asarray(Image.open(other / split / "images" / "1.png"))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    assert _rows(again / "bananas_train") != _rows(other / "bananas_train")


def test_task_is_not_trivial(generated: Path) -> None:
    """Boxes vary in size and place, and yellow-ish distractors appear outside the box."""
    rows = _rows(generated / "bananas_train")
    boxes = np.array([[int(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for r in rows])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert widths.std() > 5 and heights.std() > 5 and boxes[:, 0].std() > 10
    with_distractors = 0
    for r, (x0, y0, x1, y1) in zip(rows, boxes, strict=True):
        img = np.asarray(Image.open(generated / "bananas_train" / "images" / r["img_name"]))
        rgb = img.astype(int)
        yellow = (rgb[..., 0] > 180) & (rgb[..., 1] > 140) & (rgb[..., 2] < 110)
        yellow[y0:y1, x0:x1] = False
        with_distractors += int(yellow.sum() > 100)
    assert with_distractors >= len(rows) // 2


def test_reuse_and_regenerate(tmp_path: Path) -> None:
    root = tmp_path / "banana-synthetic"
    generate_banana_dataset(root, num_train=2, num_val=1, seed=0)
    label = root / "bananas_train" / "label.csv"
    stamp = label.stat().st_mtime_ns
    assert synthetic_is_current(root, 2, 1, 0)
    generate_banana_dataset(root, num_train=2, num_val=1, seed=0)  # up to date: reused
    assert label.stat().st_mtime_ns == stamp
    assert not synthetic_is_current(root, 3, 1, 0)
    generate_banana_dataset(root, num_train=3, num_val=1, seed=0)  # stale: replaced
    assert len(_rows(root / "bananas_train")) == 3
    assert synthetic_is_current(root, 3, 1, 0)
    assert sorted(os.listdir(tmp_path)) == ["banana-synthetic"]


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import src.data.synthetic as syn

    calls = {"n": 0}
    real_render = syn.render_sample

    def flaky(rng, size=256, draw_banana=True):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_render(rng, size, draw_banana)

    monkeypatch.setattr(syn, "render_sample", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_banana_dataset(tmp_path / "banana-synthetic", num_train=4, num_val=1)
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    root = tmp_path / "banana-detection"
    (root / "bananas_train").mkdir(parents=True)
    (root / "bananas_train" / "label.csv").write_text("real data\n")
    with pytest.raises(FileExistsError, match="not a synthetic banana set"):
        generate_banana_dataset(root, num_train=1, num_val=1)
    assert (root / "bananas_train" / "label.csv").read_text() == "real data\n"


def test_validation() -> None:
    with pytest.raises(ValueError, match="num_synthetic_train"):
        generate_banana_dataset("unused", num_train=0, num_val=1)
    with pytest.raises(ValueError, match="image_size"):
        generate_banana_dataset("unused", num_train=1, num_val=1, image_size=8)
