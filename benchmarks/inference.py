"""Inference speed (images/s) of the whole detector: eager PyTorch float32 and bf16, onnxruntime
float32, int8 (static QDQ) and int8 dynamic.

The detector is ``src.export.Detector`` (network + decoding + per-class NMS, what
``python -m src.export`` writes) built from the training config with random weights (speed does
not depend on them; the score threshold is raised to 0.3 so that NMS sees a realistic few
candidates): ``--model tiny`` (the book's TinySSD, 256x256, 1 class) or ``--model ssd300``
(VGG16 SSD300, 20 classes). Each engine runs batch 1 and batch 8; rounds alternate between the
engines; medians are printed with their ratio to eager float32 of the same run. The int8 models
are ``python -m src.export quantize=int8`` / ``quantize=int8_dynamic`` of the same network
(``src.export.quantize_onnx``), calibrated here on 16 random images (the speed does not depend on
the ranges; docs/export.md has the accuracy on real images). The header names the CPU and
whether it has AMX (``amx_bf16``, ``amx_int8``) and AVX-512 VNNI / BF16.

    python benchmarks/inference.py --model ssd300
    python benchmarks/inference.py --model tiny --batches 1,8,32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from src.export import Detector, export_onnx, quantize_onnx  # noqa: E402
from src.utils.malloc import reexec_with_malloc_tunables  # noqa: E402


def build_module(model: str):  # noqa: ANN201
    """A randomly initialised ``SSDLitModule`` for ``tiny`` (1 class) or ``ssd300`` (20)."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    if model == "tiny":
        overrides, names = ["model.net.num_classes=1"], ["banana"]
    else:
        names = [f"class{i}" for i in range(20)]
        overrides = [
            "experiment=voc_ssd300",
            "backbone.pretrained=null",
            "model.net.num_classes=20",
        ]
    overrides += ["paths.output_dir=/tmp/bench", "model.postprocess.score_threshold=0.3"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    return instantiate(cfg.model, class_names=names).eval(), names


def cpu_description() -> str:
    """The CPU's model name and its AMX / AVX-512 VNNI / BF16 flags (Linux ``/proc/cpuinfo``)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():  # the first processor's lines
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    flags = set(fields.get("flags", "").split())
    wanted = ["amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512_bf16"]
    present = [f for f in wanted if f in flags]
    return f"{name or platform.machine()} (flags: {', '.join(present) or 'no AMX/VNNI/BF16'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "ssd300"], default="ssd300")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per engine per round")
    args = parser.parse_args()
    reexec_with_malloc_tunables()  # the allocator settings of `python -m src.predict`

    import onnxruntime as ort

    module, names = build_module(args.model)
    detector = Detector(module).eval()
    height, width = (int(v) for v in module.net.image_size)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    calibration = torch.rand(16, 3, height, width, generator=torch.Generator().manual_seed(2))
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, Path(tmp) / "model.onnx", names)
        models = {
            "onnxruntime float32": path,
            "onnxruntime int8": quantize_onnx(path, Path(tmp) / "int8.onnx", "int8", calibration),
            "onnxruntime int8 dyn": quantize_onnx(path, Path(tmp) / "dyn.onnx", "int8_dynamic"),
        }
        for name, model_path in models.items():
            sessions[name] = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )

    def eager(images: torch.Tensor, bf16: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return detector(images)

        return run

    results: dict[tuple[str, int], list[float]] = {}
    for batch in map(int, args.batches.split(",")):
        images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
        feed = {"images": images.numpy()}
        engines = {
            "eager float32": eager(images, False),
            "eager bf16 autocast": eager(images, True),
            **{
                name: (lambda feed=feed, session=session: session.run(None, feed))
                for name, session in sessions.items()
            },
        }
        for _ in range(args.rounds):
            for name, fn in engines.items():
                fn()  # warm-up
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn()
                    results.setdefault((name, batch), []).append(time.perf_counter() - t0)

    print(
        f"cpu: {cpu_description()}; cpus: {os.cpu_count()}; "
        f"torch threads: {torch.get_num_threads()}; torch {torch.__version__}; "
        f"onnxruntime {ort.__version__}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(
        f"model {args.model} ({height}x{width}, network + decoding + NMS); {args.rounds} "
        f"alternating rounds x {args.repeats} calls"
    )
    medians = {key: statistics.median(times) for key, times in results.items()}
    for (name, batch), median in medians.items():
        ratio = medians[("eager float32", batch)] / median  # speed-up over eager float32
        print(
            f"{name:<21} batch {batch:>3}: median {median * 1e3:8.1f} ms  "
            f"{batch / median:8.1f} images/s  x{ratio:5.2f} eager float32"
        )


if __name__ == "__main__":
    main()
