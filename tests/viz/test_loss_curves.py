from __future__ import annotations

from pathlib import Path

import torch

from src.viz.loss_curves import focal_curves, smooth_l1_curves, write_loss_figures


def test_smooth_l1_curves_are_the_books_formula() -> None:
    x, curves = smooth_l1_curves()
    assert set(curves) == {10.0, 1.0, 0.5}
    for sigma, y in curves.items():
        expected = torch.where(
            x.abs() < 1 / sigma**2, (sigma * x) ** 2 / 2, x.abs() - 0.5 / sigma**2
        )
        torch.testing.assert_close(y, expected)


def test_focal_curves_are_the_books_formula() -> None:
    p, curves = focal_curves()
    assert set(curves) == {0.0, 1.0, 5.0}
    for gamma, y in curves.items():
        torch.testing.assert_close(y, -((1 - p) ** gamma) * torch.log(p), atol=1e-5, rtol=1e-4)


def test_write_loss_figures(tmp_path: Path) -> None:
    files = write_loss_figures(tmp_path)
    assert set(files) == {"smooth_l1", "focal_loss"}
    for path in files.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
