"""Export entry point: ``python -m src.export ckpt_path=PATH format=onnx [output=PATH]``.

The ONNX model holds the whole detector: the network (input normalisation included), the box
decoding, the score threshold, the per-class (or class-agnostic) NMS and the per-image limit of
the checkpoint's ``model.postprocess``, so onnxruntime gives the same detections as PyTorch.

* input ``images``: ``float32[B, 3, H, W]`` RGB in ``[0, 1]`` at the network's input size
  (``image_size`` in the metadata), any batch size ``B``;
* output ``detections``: ``float32[N, 7]`` rows ``(image, label, score, x1, y1, x2, y2)``: the
  image's index in the batch, the 0-based class (``class_names[label]``), the class probability
  and the box in normalised xyxy (multiply by the image's width and height), sorted by image and
  then by score; :func:`split_detections` turns them into one dict per image.

The model's metadata (``onnx.ModelProto.metadata_props``, onnxruntime's
``get_modelmeta().custom_metadata_map``) holds ``class_names`` (JSON list), ``image_size``
(JSON ``[H, W]``), ``postprocess`` (its settings) and ``detections`` (the row layout).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from src.utils.checkpoint import load_module
from src.utils.config import set_project_root
from src.utils.errors import report_errors

log = logging.getLogger(__name__)

set_project_root()

__all__ = ["Detector", "export", "export_onnx", "split_detections"]

DETECTION_COLUMNS = ["image", "label", "score", "x1", "y1", "x2", "y2"]


class Detector(nn.Module):
    """A trained ``SSDLitModule``'s network and post-processing as one module (what is exported).

    Args:
        module: the module (its ``net`` and ``postprocess`` are used).

    """

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.net = module.net
        self.postprocess = module.postprocess

    def forward(self, images: Tensor) -> Tensor:
        """``images[B, 3, H, W]`` in ``[0, 1]`` -> ``detections[N, 7]`` (see the module doc)."""
        out = self.net(images)
        return self.postprocess.flat(out.cls_logits.float(), out.box_deltas.float(), out.anchors)


def split_detections(detections: Any, batch: int) -> list[dict[str, Any]]:
    """Split ``detections[N, 7]`` (a tensor or a numpy array) into one dict per image.

    Returns:
        ``batch`` dicts with ``boxes[N_i, 4]`` (normalised xyxy), ``scores[N_i]`` and
        ``labels[N_i]`` (int64), of the input's kind.

    """
    image = detections[:, 0]
    out = []
    for b in range(batch):  # per image of the batch (a handful), not per box
        rows = detections[image == b]
        out.append(
            {"boxes": rows[:, 3:7], "scores": rows[:, 2], "labels": rows[:, 1].astype("int64")}
            if not isinstance(rows, Tensor)
            else {"boxes": rows[:, 3:7], "scores": rows[:, 2], "labels": rows[:, 1].long()}
        )
    return out


def _import_onnx():  # noqa: ANN202
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "format=onnx needs the onnx package: pip install -e '.[export]' (onnx, onnxruntime)"
        ) from err
    return onnx


def export_onnx(
    module: Any,
    path: str | Path,
    class_names: list[str],
    opset: int = 17,
) -> Path:
    """Write ``module`` (network + post-processing) as an ONNX model with its metadata.

    Args:
        module: a trained ``SSDLitModule`` (eval mode, CPU).
        path: the ``.onnx`` file to write (its folder is created).
        class_names: the object classes, in label order (stored in the metadata).
        opset: ONNX opset, >= 11.

    Returns:
        ``path``.

    """
    onnx = _import_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector = Detector(module).eval().float()
    height, width = (int(v) for v in module.net.image_size)
    example = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        # tracing turns the input-size checks and the anchor count into constants, as intended
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            detector,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["detections"],
            dynamic_axes={"images": {0: "batch"}, "detections": {0: "num_detections"}},
            opset_version=int(opset),
            dynamo=False,
        )
    model = onnx.load(str(path))
    pp = module.postprocess
    metadata = {
        "class_names": json.dumps(list(class_names)),
        "image_size": json.dumps([height, width]),
        "input": "images: float32[B, 3, H, W] RGB in [0, 1] at image_size",
        "detections": json.dumps(DETECTION_COLUMNS),
        "postprocess": json.dumps(
            {
                "score_threshold": pp.score_threshold,
                "nms_threshold": pp.nms_threshold,
                "topk_candidates": pp.topk_candidates,
                "detections_per_image": pp.detections_per_image,
                "class_agnostic": pp.class_agnostic,
            }
        ),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def verify_onnx(module: Any, path: str | Path, images: Tensor, atol: float = 1e-4) -> int:
    """Run ``images`` through PyTorch and onnxruntime; fail unless the detections agree.

    Returns:
        The number of detections compared.

    Raises:
        AssertionError: different kept boxes (count, image, label) or coordinates/scores further
            apart than ``atol``.

    """
    import onnxruntime as ort

    with torch.no_grad():
        expected = Detector(module).eval()(images).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    if got.shape != expected.shape or not (got[:, :2] == expected[:, :2]).all():
        raise AssertionError(
            f"onnxruntime kept {got.shape[0]} detections, PyTorch {expected.shape[0]}, or their "
            "images/labels differ"
        )
    diff = float(abs(got[:, 2:] - expected[:, 2:]).max()) if len(got) else 0.0
    if diff > atol:
        raise AssertionError(f"onnxruntime and PyTorch scores/boxes differ by {diff:.2e} > {atol}")
    return int(got.shape[0])


def export(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt_path`` in ``cfg.format`` to ``cfg.output`` (see ``conf/export.yaml``).

    Returns:
        The written file.

    Raises:
        ValueError: an unknown ``format``.

    """
    if cfg.format != "onnx":
        raise ValueError(f"format={cfg.format} is not supported; use format=onnx")
    module, run_config = load_module(cfg.ckpt_path)
    module = module.float().to(memory_format=torch.contiguous_format)
    names = list(module.class_names or run_config.model.get("class_names") or [])
    if not names:  # a run without class names: their indices
        names = [str(i) for i in range(int(run_config.model.net.num_classes))]
    output = cfg.output or Path(cfg.paths.output_dir) / f"{Path(cfg.ckpt_path).stem}.onnx"
    path = export_onnx(module, output, names, opset=cfg.opset)
    log.info("Wrote %s (%d classes: %s)", path, len(names), ", ".join(map(str, names[:5])))
    if cfg.verify:
        height, width = (int(v) for v in module.net.image_size)
        images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1))
        count = verify_onnx(module, path, images)
        log.info("onnxruntime equals PyTorch on 2 random images (%d detections)", count)
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
@report_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    export(cfg)


if __name__ == "__main__":
    main()
