"""Tests for the verified, atomic download (src.data.download), against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import socket
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from src.data.banana import BananaDataModule
from src.data.download import (
    BANANA_SHA1,
    BANANA_URL,
    DownloadError,
    download_and_extract,
    sha1_of_file,
)

REQUIRED = ["bananas_train/label.csv", "bananas_val/label.csv"]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(base_url, served_dir)`` of an HTTP server on 127.0.0.1 in a thread."""
    served = tmp_path_factory.mktemp("served")
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def _book_zip(path: Path, top: str = "banana-detection", extra: dict | None = None) -> str:
    """Write a zip in the book's layout (3 train / 2 val images); return its SHA-1."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, count in (("bananas_train", 3), ("bananas_val", 2)):
            lines = ["img_name,label,xmin,ymin,xmax,ymax"]
            for i in range(count):
                zf.writestr(f"{top}/{split}/images/{i}.png", _png((40 * i, 200, 30)))
                lines.append(f"{i}.png,0,{2 + i},3,{20 + i},25")
            zf.writestr(f"{top}/{split}/label.csv", "\n".join(lines) + "\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_book_constants() -> None:
    assert BANANA_URL == "http://d2l-data.s3-accelerate.amazonaws.com/banana-detection.zip"
    assert BANANA_SHA1 == "5de26c8fce5ccdea9f91267273464dc968d20d72"


def test_download_success(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    sha1 = _book_zip(served / "ok.zip")
    assert sha1_of_file(served / "ok.zip") == sha1
    data_dir = tmp_path / "data"
    out = download_and_extract(
        f"{base}/ok.zip", data_dir, "banana-detection", sha1=sha1, timeout=5, required=REQUIRED
    )
    assert out == data_dir / "banana-detection"
    assert os.listdir(data_dir) == ["banana-detection"]  # no temp files or dirs left
    assert sorted(os.listdir(out / "bananas_train" / "images")) == ["0.png", "1.png", "2.png"]
    assert (out / "bananas_val" / "label.csv").read_text().startswith("img_name,label")
    # an existing copy is returned untouched (no second download)
    assert download_and_extract("http://127.0.0.1:9/none.zip", data_dir, "banana-detection", None)


@pytest.mark.parametrize(
    ("name", "sha1", "match"),
    [
        ("ok.zip", "0" * 40, "checksum mismatch .*expected SHA-1 0{40}, got [0-9a-f]{40}"),
        ("missing.zip", None, "HTTP 404"),
        ("garbage.zip", "garbage", "not a valid zip file"),
        ("other_top.zip", "other_top", "no top-level folder 'banana-detection'"),
        ("incomplete.zip", "incomplete", "lacks \\['bananas_val/label.csv'\\]"),
        ("slip.zip", "slip", "unsafe member path"),
    ],
)
def test_download_failures_leave_nothing(
    server: tuple[str, Path], tmp_path: Path, name: str, sha1: str | None, match: str
) -> None:
    base, served = server
    if name == "ok.zip":
        _book_zip(served / name)
    elif name == "garbage.zip":
        (served / name).write_bytes(b"this is not a zip archive")
        sha1 = sha1_of_file(served / name)
    elif name == "other_top.zip":
        sha1 = _book_zip(served / name, top="bananas")
    elif name == "incomplete.zip":
        with zipfile.ZipFile(served / name, "w") as zf:
            zf.writestr("banana-detection/bananas_train/label.csv", "img_name\n")
        sha1 = sha1_of_file(served / name)
    elif name == "slip.zip":
        sha1 = _book_zip(served / name, extra={"../evil.txt": "x"})
    data_dir = tmp_path / "data"
    with pytest.raises(DownloadError, match=match) as info:
        download_and_extract(
            f"{base}/{name}", data_dir, "banana-detection", sha1=sha1, timeout=5, required=REQUIRED
        )
    assert f"{base}/{name}" in str(info.value)
    assert os.listdir(data_dir) == []  # no dataset dir, no temp zip, no temp extract dir
    assert not (tmp_path / "evil.txt").exists()


def test_download_timeout(tmp_path: Path) -> None:
    """A server that accepts the connection but never answers: the timeout fires."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/slow.zip"
        with pytest.raises(DownloadError, match="timed out"):
            download_and_extract(url, tmp_path, "banana-detection", sha1=None, timeout=0.3)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- via the DataModule
def _datamodule(data_dir: Path, url: str, sha1: str | None, source: str) -> BananaDataModule:
    return BananaDataModule(
        data_dir=data_dir,
        source=source,
        download=True,
        url=url,
        sha1=sha1,
        download_timeout=5,
        image_size=32,
        batch_size=2,
        num_synthetic_train=2,
        num_synthetic_val=2,
    )


def test_datamodule_downloads_real(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    sha1 = _book_zip(served / "dm.zip")
    dm = _datamodule(tmp_path, f"{base}/dm.zip", sha1, "real")
    dm.prepare_data()
    assert dm.hparams["resolved_source"] == "real"
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 2
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32)
    assert not (tmp_path / "banana-synthetic").exists()


def test_datamodule_real_download_failure_is_clear(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = server
    dm = _datamodule(tmp_path, f"{base}/missing.zip", None, "real")
    with pytest.raises(DownloadError, match="HTTP 404.*data.source=synthetic"):
        dm.prepare_data()
    assert os.listdir(tmp_path) == []


def test_datamodule_auto_checksum_failure_falls_back(
    server: tuple[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, served = server
    _book_zip(served / "bad.zip")
    dm = _datamodule(tmp_path, f"{base}/bad.zip", "f" * 40, "auto")
    with caplog.at_level(logging.WARNING, logger="src.data.banana"):
        dm.prepare_data()
    assert dm.hparams["resolved_source"] == "synthetic"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SYNTHETIC" in warnings[0].getMessage()
    assert "checksum mismatch" in warnings[0].getMessage()
    assert sorted(os.listdir(tmp_path)) == ["banana-synthetic"]


def test_interrupted_download_leaves_no_part_file(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import src.data.download as download

    def interrupted(url: str, dest: Path, timeout: float) -> str:
        dest.write_bytes(b"half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_and_extract(f"{server[0]}/x.zip", tmp_path, "banana-detection", sha1=None)
    assert os.listdir(tmp_path) == []


def test_stale_part_file_of_a_killed_download_is_removed(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, served = server
    sha1 = _book_zip(served / "good2.zip")
    stale = tmp_path / ".banana-detection-abc.zip.part"
    stale.write_bytes(b"left by kill -9")
    os.utime(stale, (0, 0))  # long ago
    download_and_extract(f"{base}/good2.zip", tmp_path, "banana-detection", sha1, required=REQUIRED)
    assert sorted(os.listdir(tmp_path)) == ["banana-detection"]


def test_auto_does_not_retry_a_failed_download_in_the_same_process(
    server: tuple[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import src.data.banana as banana

    base, _ = server
    url = f"{base}/does-not-exist.zip"
    _datamodule(tmp_path / "a", url, None, "auto").prepare_data()
    calls: list[str] = []
    real = banana.download_and_extract
    monkeypatch.setattr(
        banana, "download_and_extract", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    dm = _datamodule(tmp_path / "b", url, None, "auto")
    with caplog.at_level(logging.WARNING, logger="src.data.banana"):
        dm.prepare_data()
    assert calls == [] and dm.hparams["resolved_source"] == "synthetic"
    assert "failed earlier in this process" in caplog.text and "HTTP 404" in caplog.text
