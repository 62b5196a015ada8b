"""Issue 35, part 2 (the library contract): what generic code asks of a library is the library's to answer, by
name. A position override names the parameters it reads (no open_clip attribute assumed), and layer-wise LR decay is
an optional answer: a library that names no blocks trains its backbone at one learning rate, with one warning."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kaggle_i2p.models.backbones.base import BackboneLibrary
from kaggle_i2p.models.towers import Tower
from kaggle_i2p.train.recipe import llrd_param_groups


class GridNet(nn.Module):
    """A backbone of another library whose position table is called `grid` (not open_clip's name)."""

    def __init__(self):
        super().__init__()
        self.grid = nn.Parameter(torch.arange(4.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)).sum(dim=1, keepdim=True) + self.grid.sum()


def test_a_position_override_reads_the_parameters_its_library_names():
    calls = []

    def for_size(backbone: nn.Module, height: int, width: int) -> dict[str, torch.Tensor]:
        calls.append((height, width))
        return {"grid": backbone.grid * (height / 32)}  # the table stretched to the size

    tower = Tower(GridNet(), nn.Identity(), SimpleNamespace(library="gridlib"), for_size, 32, ("grid",)).eval()
    images = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        first = tower(images)
        again = tower(images)
    assert torch.equal(first, torch.full((2, 1), 12.0)) and torch.equal(first, again)
    assert calls == [(64, 64)]  # made once while the table is unchanged
    with torch.no_grad():
        tower.backbone.grid.add_(1.0)  # trained in place: the copy is made again
        assert torch.equal(tower(images), torch.full((2, 1), 20.0))
        assert torch.equal(tower(torch.zeros(1, 3, 32, 32)), torch.full((1, 1), 10.0))  # the native size: as stored
    assert calls == [(64, 64), (64, 64)]


class ServeOnly(BackboneLibrary):
    """A library that answers nothing about training (no block patterns)."""

    name = "serve_only_test"

    def build(self, arch, native_resolution, classes):
        raise NotImplementedError


class Stacked(nn.Module):
    """A tower whose backbone has `blocks.N` in its names, as many do."""

    def __init__(self, library: BackboneLibrary):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
        self.head = nn.Linear(2, 2)
        self.library = library


def test_a_library_that_names_no_blocks_trains_flat_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="kaggle_i2p"):
        groups = llrd_param_groups(Stacked(ServeOnly()), lr=1e-3, layer_decay=0.7)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert [r.getMessage() for r in caplog.records] == [
        "layer_decay 0.7: the serve_only_test library names no blocks of this backbone (it answers no layer-wise LR "
        "decay), so the whole backbone trains at the stage's lr"]


@pytest.mark.parametrize("name", ["timm", "open_clip"])
def test_the_libraries_that_answer_decay_still_decay_by_block(name, caplog):
    from kaggle_i2p.core.registry import LIBRARIES

    with caplog.at_level(logging.WARNING, logger="kaggle_i2p"):
        groups = llrd_param_groups(Stacked(LIBRARIES.get(name)), lr=1e-3, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.5 ** 3, 0.5 ** 2, 0.5, 1.0] and not caplog.records  # blocks 1..3, then the head
