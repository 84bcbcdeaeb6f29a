"""Fixtures for the model tests."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TORCH_HOME; downloading is an error."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case someone called torch.hub.set_dir

    def no_download(url: str, dst: str, *args, **kwargs) -> None:
        raise URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path
