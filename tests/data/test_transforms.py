"""Tests for src.data.transforms and src.data.collate."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from src.data.collate import detection_collate
from src.data.transforms import DetectionTransform, build_transforms

H, W = 120, 160  # input canvas (rows, cols)


def _target(boxes: list[list[float]], labels: list[int], **extra) -> dict:
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(H, W),
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "orig_size": torch.tensor([H, W]),
        "image_id": "img_7",
        **extra,
    }


def _random_image(seed: int = 0) -> tv_tensors.Image:
    g = torch.Generator().manual_seed(seed)
    return tv_tensors.Image(torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g))


# --------------------------------------------------------------------------- eval / "none"
@pytest.mark.parametrize("augment", ["none", "ssd"])
def test_eval_is_deterministic_resize_and_float(augment: str) -> None:
    tf = build_transforms(train=False, image_size=64, augment=augment)
    image = _random_image()
    target = _target([[16.0, 12.0, 80.0, 96.0]], [0])
    out1, t1 = tf(image, target)
    out2, t2 = tf(image, target)
    assert out1.shape == (3, 64, 64) and out1.dtype == torch.float32
    assert type(out1) is torch.Tensor
    assert float(out1.min()) >= 0.0 and float(out1.max()) <= 1.0
    assert torch.equal(out1, out2)
    # resizing keeps normalised boxes: x / W, y / H
    expected = torch.tensor([[16 / W, 12 / H, 80 / W, 96 / H]])
    assert type(t1["boxes"]) is torch.Tensor and t1["boxes"].dtype == torch.float32
    torch.testing.assert_close(t1["boxes"], expected)
    assert torch.equal(t1["labels"], torch.tensor([0]))
    assert t1["image_id"] == "img_7"
    assert torch.equal(t1["orig_size"], torch.tensor([H, W]))


def test_resize_scales_pixels_and_non_square_size() -> None:
    tf = build_transforms(train=False, image_size=(30, 80))
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    image[:, 60:120, 0:80] = 255  # bottom-left quarter
    out, target = tf(tv_tensors.Image(image), _target([[0.0, 60.0, 80.0, 120.0]], [0]))
    assert out.shape == (3, 30, 80)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.5, 0.5, 1.0]]))
    # the white region covers the box in resized pixels: rows 15..29, cols 0..39
    white = out[0] > 0.5
    rows, cols = white.nonzero(as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (15, 29, 0, 39)


def test_none_skips_resize_when_size_matches() -> None:
    image = _random_image()
    tf = build_transforms(train=True, image_size=(H, W), augment="none")
    out, target = tf(image, _target([[1.0, 2.0, 3.0, 4.0]], [0]))
    torch.testing.assert_close(out, image.float() / 255.0, rtol=0, atol=1e-6)
    assert out.data_ptr() != image.data_ptr()


def test_float_input_output_never_aliases_input() -> None:
    image = tv_tensors.Image(torch.rand(3, H, W))
    out, _ = build_transforms(False, (H, W))(image, _target([[1.0, 2.0, 3.0, 4.0]], [0]))
    assert out.data_ptr() != image.data_ptr()
    out.zero_()
    assert float(image.sum()) > 0


def test_plain_tensor_boxes_and_pil_image_accepted() -> None:
    from PIL import Image

    pil = Image.new("RGB", (W, H), (10, 20, 30))
    target = _target([[0.0, 0.0, 80.0, 60.0]], [0])
    target["boxes"] = torch.tensor([[0.0, 0.0, 80.0, 60.0]])
    out, t = build_transforms(False, 32)(pil, target)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 0.5, 0.5]]))


def test_other_box_formats_are_converted() -> None:
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[40.0, 30.0, 80.0, 60.0]]), format="CXCYWH", canvas_size=(H, W)
    )
    target = {**_target([[0.0, 0.0, 1.0, 1.0]], [0]), "boxes": boxes}
    _, t = build_transforms(False, 32)(_random_image(), target)
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 0.5, 0.5]]))


def test_flip_maps_x_to_one_minus_x() -> None:
    tf = DetectionTransform(True, "ssd", (H, W), v2.Compose([v2.RandomHorizontalFlip(p=1.0)]))
    image = _random_image()
    out, t = tf(image, _target([[16.0, 12.0, 40.0, 96.0]], [0]))
    x0, y0, x1, y1 = 16 / W, 12 / H, 40 / W, 96 / H
    torch.testing.assert_close(t["boxes"], torch.tensor([[1 - x1, y0, 1 - x0, y1]]))
    torch.testing.assert_close(out, image.flip(-1).float() / 255.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"augment": "foo"}, "data.augment must be one of none, flip, photometric, ssd; got 'foo'"),
        ({"image_size": 0}, "image_size must be positive"),
        ({"image_size": [1, 2, 3]}, "image_size must be an int"),
        ({"fill": (0.5, 0.5)}, "fill must be 3 values"),
        ({"fill": (124, 116, 104)}, "fill must be 3 values in \\[0, 1\\]"),
    ],
)
def test_build_transforms_validates(kwargs: dict, match: str) -> None:
    args = {"train": True, "image_size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_transforms(**args)


def test_missing_keys_error() -> None:
    with pytest.raises(KeyError, match="'boxes' and 'labels'"):
        build_transforms(False, 32)(_random_image(), {"labels": torch.zeros(0)})


# --------------------------------------------------------------------------- "ssd"
def _marker_scene() -> tuple[tv_tensors.Image, dict]:
    """Black canvas with one white rectangle exactly at the box.

    Photometric distortion keeps grey pixels grey and keeps white brighter than black by more
    than 100 levels, and the zoom-out fill used below is magenta, so the white region can be
    recovered from the augmented image independently of the transformed box.
    """
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    x0, y0, x1, y1 = 50, 30, 110, 80
    image[:, y0:y1, x0:x1] = 255
    return tv_tensors.Image(image), _target([[x0, y0, x1, y1]], [0])


def _white_box(out: torch.Tensor, centre: torch.Tensor) -> torch.Tensor | None:
    """Tight normalised box of the rectangle's pixels in an augmented marker image."""
    size = out.shape[-1]
    pix = out * 255.0
    grey = (pix.amax(0) - pix.amin(0)) < 30  # the magenta fill is far from grey
    cy = int(centre[1] * size)
    cx = int(centre[0] * size)
    ref = float(pix[:, min(cy, size - 1), min(cx, size - 1)].mean())
    white = grey & (pix.mean(0) > ref - 50)
    rows, cols = white.nonzero(as_tuple=True)
    if len(rows) == 0:
        return None
    box = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float)
    return box / size


def test_ssd_boxes_track_the_marked_region() -> None:
    size = 64
    tf = build_transforms(train=True, image_size=size, augment="ssd", fill=(1.0, 0.0, 1.0))
    image, target = _marker_scene()
    eval_box = torch.tensor([50 / W, 30 / H, 110 / W, 80 / H])
    changed = flipped = shrunk = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, t = tf(image, target)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert t["boxes"].shape == (1, 4), f"seed {seed}: the only box was dropped"
        box = t["boxes"][0]
        assert ((box >= 0) & (box <= 1)).all()
        centre = torch.stack([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        found = _white_box(out, centre)
        assert found is not None, f"seed {seed}: marker not found"
        # within 2 output pixels (antialiased resize blurs the edges by about one pixel)
        torch.testing.assert_close(found, box, atol=2.0 / size, rtol=0, msg=f"seed {seed}")
        changed += int(not torch.allclose(box, eval_box, atol=1e-3))
        flipped += int(float(centre[0]) > 0.5 + 1e-3)  # the marker starts left of centre
        shrunk += int(float(box[2] - box[0]) < 0.9 * float(eval_box[2] - eval_box[0]))
    # the seeds really exercise flips, zoom-outs and crops
    assert changed >= 20 and flipped >= 5 and shrunk >= 5


def test_ssd_zero_boxes_skips_iou_crop() -> None:
    tf = build_transforms(train=True, image_size=48, augment="ssd")
    target = _target([], [])
    for seed in range(10):
        torch.manual_seed(seed)
        out, t = tf(_random_image(seed), target)
        assert out.shape == (3, 48, 48)
        assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].shape == (0,)


def test_ssd_sanitize_keeps_per_box_keys_aligned() -> None:
    tf = build_transforms(train=True, image_size=64, augment="ssd")
    boxes = [
        [10.0, 10.0, 60.0, 50.0],  # 0 valid
        [20.0, 20.0, 20.0, 70.0],  # 1 zero width
        [90.0, 40.0, 150.0, 110.0],  # 2 valid
        [30.0, 90.0, 100.0, 90.0],  # 3 zero height
        [70.0, 5.0, 130.0, 35.0],  # 4 valid
    ]
    labels = [0, 1, 2, 3, 4]
    difficult = torch.tensor([False, True, True, False, False])
    target = _target(boxes, labels, difficult=difficult)
    seen: set[int] = set()
    for seed in range(25):
        torch.manual_seed(seed)
        _, t = tf(_random_image(seed), target)
        kept = t["labels"]
        assert len(kept) == len(t["boxes"]) == len(t["difficult"])
        assert t["difficult"].dtype == torch.bool
        assert not ({1, 3} & set(kept.tolist())), f"seed {seed}: degenerate box kept"
        torch.testing.assert_close(t["difficult"], difficult[kept])
        assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) > 0).all()
        seen.update(kept.tolist())
    assert seen == {0, 2, 4}


def test_transforms_do_not_modify_inputs() -> None:
    tf = build_transforms(train=True, image_size=64, augment="ssd")
    image = _random_image()
    target = _target([[10.0, 10.0, 60.0, 50.0], [5.0, 5.0, 5.0, 9.0]], [0, 1])
    target["difficult"] = torch.tensor([False, True])
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
    image_before = image.clone()
    keys_before = set(target)
    for seed in range(10):
        torch.manual_seed(seed)
        tf(image, target)
    assert torch.equal(image, image_before)
    assert set(target) == keys_before
    for key, value in snapshot.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(target[key], value), key
        else:
            assert target[key] == value
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)


def test_passthrough_keys_untouched_by_ssd() -> None:
    tf = build_transforms(train=True, image_size=64, augment="ssd")
    torch.manual_seed(0)
    target = _target([[10.0, 10.0, 60.0, 50.0]], [0])
    _, t = tf(_random_image(), target)
    assert t["image_id"] == "img_7"
    assert torch.equal(t["orig_size"], torch.tensor([H, W]))


def test_transforms_pickle() -> None:
    for tf in (build_transforms(True, 64, "ssd"), build_transforms(False, 64)):
        clone = pickle.loads(pickle.dumps(tf))
        torch.manual_seed(3)
        a = tf(_random_image(), _target([[10.0, 10.0, 60.0, 50.0]], [0]))
        torch.manual_seed(3)
        b = clone(_random_image(), _target([[10.0, 10.0, 60.0, 50.0]], [0]))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


# --------------------------------------------------------------------------- collate
def test_detection_collate_shapes() -> None:
    batch = [
        (torch.rand(3, 8, 8), {"boxes": torch.rand(g, 4), "labels": torch.zeros(g)})
        for g in (0, 1, 3)
    ]
    images, targets = detection_collate(batch)
    assert images.shape == (3, 3, 8, 8)
    assert [len(t["boxes"]) for t in targets] == [0, 1, 3]
    assert targets[2] is batch[2][1]
    assert torch.equal(images[1], batch[1][0])


def test_detection_collate_errors() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        detection_collate([])
    batch = [
        (torch.rand(3, 8, 8), {"image_id": "a"}),
        (torch.rand(3, 8, 9), {"image_id": "b"}),
    ]
    with pytest.raises(ValueError, match="different shapes.*data.image_size"):
        detection_collate(batch)


def test_flip_augmentation_keeps_every_box_and_mirrors_x() -> None:
    from torchvision import tv_tensors

    from src.data.transforms import build_transforms

    image = tv_tensors.Image(torch.zeros(3, 32, 32, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[2.0, 4.0, 10.0, 20.0]]), format="XYXY", canvas_size=(32, 32)
    )
    target = {"boxes": boxes, "labels": torch.tensor([0])}
    transform = build_transforms(train=True, image_size=32, augment="flip")
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        _, out = transform(image, dict(target))
        assert out["labels"].tolist() == [0]
        seen.add(tuple(round(v, 4) for v in out["boxes"].reshape(-1).tolist()))
    # normalised xyxy: the box itself and its mirror image (x -> 1 - x)
    assert seen == {(0.0625, 0.125, 0.3125, 0.625), (0.6875, 0.125, 0.9375, 0.625)}


def test_photometric_changes_colours_and_keeps_every_box_in_place() -> None:
    """``photometric``: colours change, boxes stay (or mirror), nothing is cropped or padded."""
    image, target = _random_image(3), _target([[16.0, 12.0, 64.0, 96.0]], [0])
    tf = build_transforms(train=True, image_size=(H, W), augment="photometric")
    plain = build_transforms(train=False, image_size=(H, W))(image, target)[0]
    boxes, recoloured = set(), 0
    for seed in range(30):
        torch.manual_seed(seed)
        out, t = tf(image, target)
        assert out.shape == (3, H, W) and out.dtype == torch.float32
        assert t["labels"].tolist() == [0]
        boxes.add(tuple(round(v, 4) for v in t["boxes"].reshape(-1).tolist()))
        mirrored = float(t["boxes"][0, 0]) > 0.5
        reference = plain.flip(-1) if mirrored else plain
        recoloured += int(not torch.allclose(out, reference))
    # normalised xyxy: the box and its mirror image only (x -> 1 - x)
    assert boxes == {(0.1, 0.1, 0.4, 0.8), (0.6, 0.1, 0.9, 0.8)}
    # each of the five colour steps runs with p=0.5, so 1 image in 32 keeps its colours
    assert recoloured >= 24
