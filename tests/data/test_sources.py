"""The data-source registry: one entry per recipe data kind, each loading (train, eval, collate)."""

from __future__ import annotations

import typing

import pytest
import torch

from distil.config.load import validate_recipe
from distil.config.schema import DataSpec
from distil.data.sources import SOURCES, data_problems, load_data, source_of
from distil.errors import DistilError


def test_every_data_kind_of_the_schema_has_a_source():
    union = typing.get_args(typing.get_args(DataSpec)[0])
    kinds = {typing.get_args(typing.get_args(member)[0].model_fields["kind"].annotation)[0] for member in union}
    assert kinds == set(SOURCES)


def test_vision_source_gives_train_eval_and_collate():
    pytest.importorskip("sklearn")
    recipe = validate_recipe({
        "name": "t", "task": "classification", "data": {"name": "digits", "eval_size": 50},
        "teacher": {"model": {"arch": "mlp"}, "train": {"steps": 1}}, "student": {"model": {"arch": "mlp"}},
        "train": {"steps": 1},
    })
    assert data_problems(recipe.data) == []
    loaded = load_data(recipe.data, seed=0)
    x, y = loaded.collate(torch.tensor([0, 5]))
    assert torch.equal(x, loaded.corpus.train_x[[0, 5]]) and torch.equal(y, loaded.corpus.train_y[[0, 5]])
    assert loaded.size == len(loaded.corpus.train_y) and len(loaded.eval[1]) == 50


def test_an_unknown_kind_is_refused():
    class Spec:
        kind = "parquet"

    with pytest.raises(DistilError, match="unknown data.kind 'parquet'"):
        source_of(Spec())
