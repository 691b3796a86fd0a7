"""Whether sglang is installed, and a request with every kind of padding."""

from __future__ import annotations

import torch

from kdcore.engines import HiddenRequest
from kdcore.engines.sglang import config as sg_config


HAVE_SGLANG = sg_config.installed_version() is not None


def padded_request(seed=0, vocab=61):
    """Mixed padding: left, right, an interior hole, a sample without positions, duplicates."""
    g = torch.Generator().manual_seed(seed)
    B, L = 5, 12
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    mask[3, 5:7] = 0  # interior hole
    mask[4, :2] = 0
    positions = [[0, 3, 11, 5], [4, 11, 7, 7], [0, 8, 1], [], [2, 11, 7, 3]]  # any order, duplicates
    return HiddenRequest(ids, mask, positions)
