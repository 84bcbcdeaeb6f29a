"""Export entry point: ``python -m src.export ckpt_path=PATH format=onnx [output=PATH]``.

``quantize=int8`` also writes ``<name>.int8.onnx``: the same detector with int8 convolutions
(onnxruntime's static QDQ quantisation, activation ranges calibrated on ``calibration_images``
validation images) and compares its VOC mAP@0.5 with the float32 model's on the validation
split; ``quantize=int8_dynamic`` quantises the weights only (activations at run time, no
calibration). See ``docs/export.md`` for the measured accuracy and speed.

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
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from src.utils.checkpoint import load_module
from src.utils.config import data_config, set_project_root
from src.utils.errors import report_errors

log = logging.getLogger(__name__)

set_project_root()

__all__ = [
    "CALIBRATION_METHODS",
    "Detector",
    "QUANTIZE_MODES",
    "export",
    "export_onnx",
    "onnx_map50",
    "quantize_onnx",
    "split_detections",
]

DETECTION_COLUMNS = ["image", "label", "score", "x1", "y1", "x2", "y2"]

#: ``quantize=`` values and what each does (``null``: float32 only).
QUANTIZE_MODES = {
    "int8": "static int8 (QDQ): weights per channel and activations, calibrated ranges",
    "int8_dynamic": "dynamic int8: weights only, activations quantised at run time",
}

#: ``calibration_method=`` values of ``quantize=int8`` (onnxruntime's ``CalibrationMethod``).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


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


class _NoPreprocessAdvice(logging.Filter):
    """Drop onnxruntime's advice to run its pre-processing (see :func:`quantize_onnx`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _calibration_reader(images: Tensor, batch: int) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over ``images[N, 3, H, W]`` in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(
                {"images": chunk.contiguous().numpy()} for chunk in images.split(batch)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self._feeds, None)

    return Reader()


def quantize_onnx(
    float_path: str | Path,
    path: str | Path,
    mode: str = "int8",
    calibration: Tensor | None = None,
    calibration_batch: int = 8,
    per_channel: bool = True,
    calibration_method: str = "minmax",
) -> Path:
    """Write an int8 copy of an exported float32 detector (``onnxruntime.quantization``).

    ``int8`` (static, QDQ format): every convolution gets int8 weights (symmetric, per output
    channel) and uint8 activations whose ranges are the min/max seen on ``calibration``;
    onnxruntime fuses the QuantizeLinear/DequantizeLinear pairs into integer convolutions (VNNI or
    AMX-INT8 where the CPU has them). Only ``Conv`` and ``MaxPool`` are quantised: the decoding,
    the softmax and NMS stay float32. ``calibration_method`` ``percentile`` (99.999th percentile of
    the absolute values) or ``entropy`` replace the min/max ranges (activations with outliers).
    ``int8_dynamic``: int8 weights only (``ConvInteger``), activations quantised at run time; no
    calibration.

    Args:
        float_path: the float32 model written by :func:`export_onnx`.
        path: the ``.onnx`` file to write.
        mode: a key of :data:`QUANTIZE_MODES`.
        calibration: ``float32[N, 3, H, W]`` images in ``[0, 1]`` at the network's input size
            (``int8`` only; a few dozen validation images).
        calibration_batch: images per calibration run.
        per_channel: one weight scale per output channel (else per tensor).
        calibration_method: ``minmax``, ``percentile`` or ``entropy`` (``int8`` only).

    Returns:
        ``path``; its metadata is the float model's plus ``quantization``.

    Raises:
        ValueError: an unknown ``mode`` or ``calibration_method``, or ``int8`` without
            calibration images.
    """
    onnx = _import_onnx()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    methods = dict(
        zip(
            CALIBRATION_METHODS,
            (CalibrationMethod.MinMax, CalibrationMethod.Percentile, CalibrationMethod.Entropy),
            strict=True,
        )
    )
    if calibration_method not in methods:
        raise ValueError(
            f"calibration_method={calibration_method} is not supported; use one of "
            f"{', '.join(methods)}"
        )
    if mode not in QUANTIZE_MODES:
        raise ValueError(
            f"quantize={mode} is not supported; use one of {', '.join(QUANTIZE_MODES)} or null"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ops = ["Conv", "MaxPool"]
    if mode == "int8" and (calibration is None or calibration.shape[0] == 0):
        raise ValueError("quantize=int8 needs calibration images (calibration_images >= 1)")
    # onnxruntime advises its pre-processing (symbolic shape inference, graph optimisation): its
    # shape inference stops at the NMS subgraph, and the exporter has already folded BatchNorm
    # into the convolutions, so the model is quantised as exported and the advice is dropped
    advice = _NoPreprocessAdvice()
    logging.getLogger().addFilter(advice)
    try:
        if mode == "int8":
            quantize_static(
                str(float_path),
                str(path),
                _calibration_reader(calibration, calibration_batch),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=ops,
                calibrate_method=methods[calibration_method],
            )
        else:
            quantize_dynamic(
                str(float_path),
                str(path),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=ops,
            )
    finally:
        logging.getLogger().removeFilter(advice)
    source = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
    model = onnx.load(str(path))
    del model.metadata_props[:]
    source["quantization"] = json.dumps(
        {
            "mode": mode,
            "what": QUANTIZE_MODES[mode],
            "ops": ops,
            "per_channel": per_channel,
            "calibration_images": 0 if calibration is None else int(calibration.shape[0]),
            "calibration_method": calibration_method if mode == "int8" else None,
        }
    )
    for key, value in source.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def onnx_map50(path: str | Path, dataset: Any, count: int, batch: int = 8) -> float:
    """VOC mAP@0.5 (the devkit's, :mod:`src.metrics.voc_map`) of an ONNX detector.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx` or :func:`quantize_onnx`.
        dataset: a validation dataset (items ``(image[3, H, W] in [0, 1], target)`` with
            normalised xyxy boxes and ``orig_size``).
        count: the first ``count`` images are used.
        batch: images per onnxruntime call.

    Returns:
        mAP@0.5 over the classes with ground truth, boxes in original-image pixels.
    """
    import onnxruntime as ort

    from src.detection.box_ops import to_pixels
    from src.metrics.voc_map import VOCMeanAveragePrecision

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metric = VOCMeanAveragePrecision(class_names=list(dataset.classes))
    count = min(int(count), len(dataset))
    for start in range(0, count, batch):  # batches of images
        items = [dataset[i] for i in range(start, min(start + batch, count))]
        images = torch.stack([image for image, _ in items])
        targets = [target for _, target in items]
        (flat,) = session.run(None, {"images": images.numpy()})
        preds = split_detections(torch.from_numpy(flat), len(items))
        truths = [
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "difficult": t.get("difficult", torch.zeros_like(t["labels"], dtype=torch.bool)),
            }
            for t in targets
        ]
        metric.update(to_pixels(preds, targets), to_pixels(truths, targets))
    return float(metric.compute()["map_50"])


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

    With ``cfg.quantize`` the float32 model is written first, then its int8 copy beside it.

    Returns:
        The written file (the int8 one when quantising).

    Raises:
        ValueError: an unknown ``format``, ``quantize`` or ``calibration_method``, or
            ``calibration_images < 1`` with ``quantize=int8``.

    """
    if cfg.format != "onnx":
        raise ValueError(f"format={cfg.format} is not supported; use format=onnx")
    quantize = cfg.get("quantize")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"quantize={quantize} is not supported; use quantize=int8 (static, calibrated), "
            "quantize=int8_dynamic or quantize=null (float32 only)"
        )
    if quantize == "int8" and int(cfg.calibration_images) < 1:
        raise ValueError(
            f"calibration_images={cfg.calibration_images}: quantize=int8 calibrates on validation "
            "images; pass calibration_images >= 1 (32 is plenty) or use quantize=int8_dynamic"
        )
    if quantize == "int8" and cfg.calibration_method not in CALIBRATION_METHODS:
        raise ValueError(
            f"calibration_method={cfg.calibration_method} is not supported; use one of "
            f"{', '.join(CALIBRATION_METHODS)}"
        )
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
    if quantize is None:
        return path
    return _export_quantized(cfg, path, run_config, quantize)


def _validation_dataset(cfg: DictConfig, run_config: DictConfig) -> Any:
    """The validation split of the checkpoint's data (or of the ``data`` group selected)."""
    datamodule = instantiate(data_config(cfg, run_config))
    datamodule.setup("validate")
    return datamodule.val_dataset


def _export_quantized(cfg: DictConfig, float_path: Path, run_config: DictConfig, mode: str) -> Path:
    """Write ``<name>.int8.onnx`` (or ``.int8_dynamic.onnx``) beside ``float_path``; compare."""
    needs_data = mode == "int8" or (cfg.verify and int(cfg.verify_images) > 0)
    dataset = _validation_dataset(cfg, run_config) if needs_data else None
    calibration = None
    if mode == "int8":
        count = min(int(cfg.calibration_images), len(dataset))
        calibration = torch.stack([dataset[i][0] for i in range(count)])
    path = float_path.with_name(f"{float_path.stem}.{mode}.onnx")
    quantize_onnx(
        float_path,
        path,
        mode,
        calibration,
        per_channel=cfg.per_channel,
        calibration_method=cfg.calibration_method,
    )
    log.info(
        "Wrote %s (%s; %.1f MB, float32 %.1f MB)",
        path,
        QUANTIZE_MODES[mode]
        + (f", {calibration.shape[0]} calibration images" if mode == "int8" else ""),
        path.stat().st_size / 1e6,
        float_path.stat().st_size / 1e6,
    )
    if cfg.verify and int(cfg.verify_images) > 0:
        count = min(int(cfg.verify_images), len(dataset))
        ours, reference = onnx_map50(path, dataset, count), onnx_map50(float_path, dataset, count)
        log.info(
            "VOC mAP@0.5 on %d validation images: %s %.4f, float32 %.4f (%+.4f)",
            count,
            mode,
            ours,
            reference,
            ours - reference,
        )
    return path


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
@report_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    export(cfg)


if __name__ == "__main__":
    main()
