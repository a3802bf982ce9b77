"""The losses registry: every divergence once, and every reader agrees with it."""

from __future__ import annotations

import inspect

import torch

from distil.config.schema import LossSpec
from distil.losses import DIVERGENCES, REGISTRY, SPARSE_DIVERGENCES
from distil.losses.fused import _KERNELS


def test_each_entry_states_the_plain_functions_parameter_defaults():
    for d in REGISTRY.values():
        signature = inspect.signature(d.plain).parameters
        own = set(signature) - {"student_logits", "teacher_logits", "temperature", "mask", "reduction"}
        assert own == set(d.params), d.name
        assert all(signature[p].default == default for p, default in d.params.items()), d.name
        assert _KERNELS[d.plain] is d.kernel


def test_the_schema_and_the_sparse_forms_read_the_registry():
    assert set(DIVERGENCES) | {"dkd"} == set(LossSpec.model_fields["divergence"].annotation.__args__)
    assert set(SPARSE_DIVERGENCES) == {"forward_kl", "reverse_kl", "generalized_jsd", "jsd"}


def test_sparse_form_equals_plain_when_targets_cover_the_vocabulary():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    for name in SPARSE_DIVERGENCES:
        d = REGISTRY.get(name) or REGISTRY["generalized_jsd"]
        full = d.sparse(s, None, torch.log_softmax(t, -1), **d.params)
        assert torch.allclose(full, d.plain(s, t, **d.params), atol=1e-5), name
