"""Pre-trained backbone weights through torchvision's weights API (the torch hub cache).

Every backbone with ``backbone.pretrained=imagenet`` reads its file here, so that a missing or
unreadable file gives the same one-sentence error naming the URL and the exact path to use.
"""

from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = ["PretrainedWeightsError", "cached_weights_path", "load_torchvision_weights"]


class PretrainedWeightsError(RuntimeError):
    """The pre-trained weights could not be obtained or read (the message says what to do)."""


def cached_weights_path(weights: WeightsEnum) -> str:
    """Where torchvision keeps ``weights``: ``<torch hub dir>/checkpoints/<file name of its URL>``.

    The torch hub dir is ``$TORCH_HOME/hub`` (by default ``~/.cache/torch/hub``).
    """
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def load_torchvision_weights(
    weights: WeightsEnum, label: str, progress: bool = True
) -> dict[str, Tensor]:
    """Torchvision's state dict for ``weights``: the cached file, else a download into the cache.

    Args:
        weights: e.g. ``torchvision.models.VGG16_Weights.IMAGENET1K_V1``.
        label: what they are, for messages (``"ImageNet VGG16"``).
        progress: show a progress bar while downloading.

    Returns:
        The state dict on CPU, read with ``weights_only=True``.

    Raises:
        PretrainedWeightsError: no cached file and the download failed (e.g. offline), or the
            cached file is unreadable; the message names the URL and the exact path to use.
    """
    path = cached_weights_path(weights)
    try:
        return weights.get_state_dict(
            progress=progress, check_hash=True, map_location="cpu", weights_only=True
        )
    except OSError as err:  # URLError, HTTPError, timeouts, unwritable cache dir
        raise PretrainedWeightsError(
            f"Could not download the {label} weights for backbone.pretrained='imagenet' "
            f"({type(err).__name__}: {err}). Download {weights.url} on a machine with network "
            f"access and put it at {path} (the torch hub cache: $TORCH_HOME/hub/checkpoints/"
            f"{os.path.basename(path)}), or set backbone.pretrained=null to train from scratch."
        ) from err
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        if not os.path.exists(path):
            raise
        raise PretrainedWeightsError(
            f"The cached {label} weights file {path} could not be read ({err}). Delete it and "
            f"download {weights.url} again to that path."
        ) from err
