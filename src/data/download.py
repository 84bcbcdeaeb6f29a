"""Verified, atomic dataset download (``urllib`` only).

The archive is streamed to a temporary file next to the destination, its SHA-1 is checked,
it is extracted into a temporary directory in the same parent and only then renamed into
place. Whatever fails (HTTP error, timeout, checksum mismatch, corrupt or unexpected archive),
no partial dataset and no temporary file is left behind and a :class:`DownloadError` names the
URL, the reason and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

BANANA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/banana-detection.zip"
BANANA_SHA1 = "5de26c8fce5ccdea9f91267273464dc968d20d72"

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed or produced unusable data (nothing was written to the destination)."""


def sha1_of_file(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Return the hex SHA-1 digest of a file.

    Args:
        path: file to hash.
        chunk_size: read size in bytes.

    Returns:
        40 lowercase hex characters.
    """
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` into the (already created) file ``dest``; return the SHA-1 of the bytes."""
    digest = hashlib.sha1()
    request = urllib.request.Request(url, headers={"User-Agent": "ssd-template/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as fh:
            for block in iter(lambda: response.read(_CHUNK), b""):
                digest.update(block)
                fh.write(block)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"downloading {url} failed: {err.reason}") from err
    except TimeoutError as err:
        raise DownloadError(
            f"downloading {url} timed out after {timeout} s (raise data.download_timeout)"
        ) from err
    except OSError as err:
        raise DownloadError(f"downloading {url} failed: {err}") from err
    return digest.hexdigest()


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Extract a zip into ``dest`` refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            root = dest.resolve()
            for member in zf.namelist():
                target = (root / member).resolve()
                if target != root and root not in target.parents:
                    raise DownloadError(f"archive from {url} has an unsafe member path {member!r}")
            zf.extractall(root)
    except zipfile.BadZipFile as err:
        raise DownloadError(
            f"archive downloaded from {url} is not a valid zip file: {err}"
        ) from err


def download_and_extract(
    url: str,
    data_dir: str | os.PathLike[str],
    folder: str,
    sha1: str | None,
    timeout: float = 60.0,
    required: Sequence[str] = (),
) -> Path:
    """Download a zip archive, verify it and atomically install its top folder.

    The archive must contain ``<folder>/...`` (e.g. ``banana-detection/bananas_train/...``).

    Args:
        url: archive URL (``http(s)://`` or ``file://``).
        data_dir: parent directory; the result is ``<data_dir>/<folder>``.
        folder: name of the archive's top-level folder, and of the installed directory.
        sha1: expected hex SHA-1 of the archive (``None`` skips the check; not recommended).
        timeout: socket timeout in seconds for connecting and for each read.
        required: paths relative to ``<folder>`` that must exist in the archive.

    Returns:
        The installed directory ``<data_dir>/<folder>``. If it already exists it is returned
        untouched without downloading.

    Raises:
        DownloadError: network/HTTP failure, timeout, checksum mismatch, corrupt archive, or
            an archive lacking ``folder`` / ``required`` files. Nothing is left behind.
    """
    data_dir = Path(data_dir)
    final = data_dir / folder
    if final.exists():
        return final
    data_dir.mkdir(parents=True, exist_ok=True)
    # leftovers of a download killed without cleanup (SIGKILL, power loss), older than a minute
    for stale in data_dir.glob(f".{folder}-*.zip.part"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 60:
                stale.unlink()
                logger.info("Removed %s, left by an interrupted download", stale)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{folder}-", suffix=".zip.part", dir=data_dir)
    os.close(fd)
    tmp_zip = Path(tmp_name)
    tmp_dir: Path | None = None
    try:
        logger.info("Downloading %s to %s (timeout %s s)", url, data_dir, timeout)
        digest = _fetch(url, tmp_zip, timeout)
        if sha1 is not None and digest.lower() != sha1.lower():
            raise DownloadError(
                f"checksum mismatch for {url}: expected SHA-1 {sha1.lower()}, got {digest} "
                f"({tmp_zip.stat().st_size} bytes); the file is corrupt or changed upstream. "
                "Retry, or place the data manually"
            )
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{folder}-extract-", dir=data_dir))
        _safe_extract(tmp_zip, tmp_dir, url)
        extracted = tmp_dir / folder
        if not extracted.is_dir():
            found = sorted(p.name for p in tmp_dir.iterdir())
            raise DownloadError(
                f"archive from {url} has no top-level folder {folder!r} (found {found})"
            )
        missing = [rel for rel in required if not (extracted / rel).exists()]
        if missing:
            raise DownloadError(f"archive from {url} lacks {missing} under {folder!r}")
        try:
            os.rename(extracted, final)
        except OSError:
            if not final.exists():
                raise
            logger.info("%s appeared concurrently; keeping the existing copy", final)
        logger.info("Installed %s", final)
        return final
    finally:
        tmp_zip.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
