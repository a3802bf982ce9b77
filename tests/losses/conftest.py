"""Fixtures shared by the fused-loss tests."""

from __future__ import annotations

import pytest

from distil.losses import fused


@pytest.fixture(params=["one block", "blocks of 2 rows"])
def row_blocks(request, monkeypatch):
    """The fused losses' elementwise work over each chunk in one block (the default at these tiny vocabularies) or in
    ragged blocks of a couple of rows (as at a real vocabulary): the result must not depend on it."""
    if request.param != "one block":
        monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 80)  # 2 rows of a 37- or 40-token vocabulary, 11 of 7
    return request.param
