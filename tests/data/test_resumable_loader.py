"""The training loader resumes at any batch: order from (seed, epoch), augmentation per sample."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

from src.data.collate import (
    ResumableDataLoader,
    ResumableSampler,
    SeededDataset,
    detection_loader,
    sample_seed,
)


class NoisyDataset(Dataset):
    """Sample ``i``: an "image" ``i + torch.rand(3, 2, 2)`` (a random augmentation) and its id."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        return index + torch.rand(3, 2, 2), {"image_id": index}


def batches(loader, count: int | None = None) -> list[tuple[list[int], Tensor]]:
    """The first ``count`` batches (all when None) as (image ids, images)."""
    out = []
    for images, targets in loader:
        out.append(([t["image_id"] for t in targets], images))
        if count is not None and len(out) == count:
            break
    return out


def loader(workers: int = 0, seed: int = 7) -> ResumableDataLoader:
    torch.manual_seed(seed)  # the data seed is torch's initial seed without PL_GLOBAL_SEED
    return detection_loader(NoisyDataset(), 3, True, workers, False, resumable=True)


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    data = SeededDataset(NoisyDataset())
    a, b = ResumableSampler(data, seed=3), ResumableSampler(data, seed=3)
    first = list(a)
    assert first == list(b) and sorted(i for i, _ in first) == list(range(10))
    assert [s for _, s in first] == [sample_seed(3, 0, i) for i, _ in first]
    a.set_epoch(1)
    assert [i for i, _ in a] != [i for i, _ in first]  # a new permutation every epoch
    b.set_epoch(1)
    b.resume_at(1, 4)  # epoch 1 starts at its 5th sample, once
    assert list(b) == list(a)[4:]
    assert list(b) == list(a)
    assert list(ResumableSampler(data, shuffle=False, seed=3))[2][0] == 2


def test_seeded_dataset_same_key_same_sample_and_caller_stream_untouched() -> None:
    data = SeededDataset(NoisyDataset())
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    x = data[(4, 123)][0]
    assert torch.equal(x, data[(4, 123)][0]) and not torch.equal(x, data[(4, 124)][0])
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream went on as before
    assert data[4][1] == {"image_id": 4} and len(data) == 10  # plain index: unseeded


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_resumes_mid_epoch(workers: int) -> None:
    reference = loader(0)
    reference.sampler.set_epoch(1)
    expected = batches(reference)  # epoch 1: 4 batches (3, 3, 3, 1)
    assert [len(ids) for ids, _ in expected] == [3, 3, 3, 1]

    stopped = loader(workers)
    stopped.sampler.set_epoch(1)
    for (ids, images), (want_ids, want) in zip(batches(stopped, 2), expected, strict=False):
        assert ids == want_ids and torch.equal(images, want)
    state = stopped.state_dict()
    assert state == {"epoch": 1, "batches": 2, "seed": 7, "samples": 10}

    resumed = loader(workers, seed=99)  # another process: another initial seed
    iterator = iter(resumed)  # Lightning may iterate before it loads the state (#20550)
    resumed.load_state_dict(state)
    rest = list(iterator)
    assert resumed.state_dict()["batches"] == 4
    assert [[t["image_id"] for t in targets] for _, targets in rest] == [
        ids for ids, _ in expected[2:]
    ]
    for (images, _), (_, want) in zip(rest, expected[2:], strict=True):
        assert torch.equal(images, want)  # the same augmentation, whichever process drew it


def test_loader_state_saved_at_epoch_end_starts_next_epoch() -> None:
    first = loader()
    assert len(batches(first)) == 4
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 4
    resumed = loader(seed=5)
    resumed.load_state_dict(state)
    assert len(batches(resumed)) == 4  # not an empty epoch
    resumed.sampler.set_epoch(1)  # Lightning's next epoch
    nxt = loader()
    nxt.sampler.set_epoch(1)
    assert [ids for ids, _ in batches(resumed)] == [ids for ids, _ in batches(nxt)]


def test_loader_state_of_other_data_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    first = loader()
    batches(first, 1)
    state = {**first.state_dict(), "samples": 11}
    resumed = loader()
    resumed.load_state_dict(state)
    assert "had 11 images, this one has 10" in caplog.text
    assert len(batches(resumed)) == 4
