"""Feature terms on real (tiny) models: names, mapping, projectors, values against direct computation, hooks."""

import pytest
import torch
from torch import nn

from distil.config.schema import FeatureTermSpec, LossSpec
from distil.distill.feature_objective import FeatureDistiller, FeatureObjective, layer_count
from distil.distill.objectives import ClassifierObjective
from distil.distill.pair import Teacher
from distil.errors import DistilError
from distil.losses.attention import minilm_relations
from distil.losses.features import attention_transfer, fitnets_hint
from distil.models.vision import CNN

CPU = torch.device("cpu")


def pair():
    torch.manual_seed(0)
    return CNN((1, 16, 16), 5, [4, 8], 16), CNN((1, 16, 16), 5, [8, 16], 32)


def term(**kw):
    return FeatureTermSpec(**kw)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_terms_equal_the_losses_computed_directly_and_train_the_projector():
    student, teacher = pair()
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 5, (6,))
    specs = [term(student="features.7", teacher="features.7", loss="fitnets", weight=0.5),
             term(student="features.{}", teacher="features.{}", layers=[[3, 3], [7, 7]], loss="at", weight=2.0)]
    distiller = FeatureDistiller(specs, student, teacher)
    projectors = distiller.build(lambda: student(x[:2]), lambda: teacher(x[:2]))
    assert len(projectors) == 1  # fitnets: a 1x1 conv from 8 to 16 channels; AT needs none
    objective = FeatureObjective(ClassifierObjective(student, Teacher(teacher), LossSpec(), CPU), distiller)
    assert set(objective.modules) == {"student", "projectors"}
    terms = objective.loss((x, y))

    s3, t3 = student.features[:4](x), teacher.features[:4](x).detach()
    s7, t7 = student.features(x), teacher.features(x).detach()
    conv = projectors.maps["0/features:7->features:7"].conv
    torch.testing.assert_close(terms["feat0_fitnets"], fitnets_hint(conv(s7), t7))
    torch.testing.assert_close(terms["feat1_at"], (attention_transfer(s3, t3) + attention_transfer(s7, t7)) / 2)
    base = ClassifierObjective(student, Teacher(teacher), LossSpec(), CPU).loss((x, y))["loss"]
    torch.testing.assert_close(terms["loss"], base + 0.5 * terms["feat0_fitnets"] + 2.0 * terms["feat1_at"])
    terms["loss"].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert student.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert hooks(student) == hooks(teacher) == 0


def test_hooks_are_removed_after_an_exception_in_the_wrapped_objective():
    student, teacher = pair()
    distiller = FeatureDistiller([term(student="features.3", teacher="features.3", loss="at")], student, teacher)

    class Broken:
        unit, modules = "samples", {"student": student}

        def loss(self, batch):
            student(batch)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        FeatureObjective(Broken(), distiller).loss(torch.randn(2, 1, 16, 16))
    assert hooks(student) == hooks(teacher) == 0


def test_wrong_names_fail_before_training_with_close_matches():
    student, teacher = pair()
    with pytest.raises(DistilError, match=r"loss.features\[0\].*close matches: features.7"):
        FeatureDistiller([term(student="feature.7", teacher="features.7", loss="mse")], student, teacher)
    with pytest.raises(DistilError, match=r"matches 2 modules but teacher .* matches 1"):
        FeatureDistiller([term(student="features.[37]", teacher="features.7", loss="at")], student, teacher)
    with pytest.raises(DistilError, match="not a supported attention module|no attention module"):
        FeatureDistiller([term(student="features.3", teacher="features.3", loss="attention_kl")], student, teacher)


def test_shape_problems_name_both_layers_and_shapes():
    student, teacher = pair()
    x = torch.randn(2, 1, 16, 16)
    never = FeatureDistiller([term(student="features.7", teacher="features.7", loss="mse", projector="never")],
                             student, teacher)
    with pytest.raises(DistilError, match=r"features.7 \[2, 8, 4, 4\] vs teacher features.7 \[2, 16, 4, 4\]"):
        never.build(lambda: student(x), lambda: teacher(x))
    at = FeatureDistiller([term(student="features.3", teacher="features.7", loss="at")], student, teacher)
    with pytest.raises(DistilError, match="same spatial size"):
        at.build(lambda: student(x), lambda: teacher(x))


def test_uniform_mapping_over_layer_templates_is_described():
    student = nn.Sequential(*[nn.Linear(4, 4) for _ in range(2)])
    teacher = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    assert layer_count(teacher, "{}") == 5
    distiller = FeatureDistiller([term(student="{}", teacher="{}", loss="mse")], student, teacher)
    assert distiller.terms[0].pairs == [("0", "0"), ("1", "4")]
    x = torch.randn(3, 4)
    distiller.build(lambda: student(x), lambda: teacher(x))
    assert len(distiller.projectors) == 0  # equal widths: auto adds none
    text = distiller.describe()
    assert "uniform mapping" in text and "student 1 -> teacher 4" in text


def test_projector_initialisation_leaves_the_global_rng_alone():
    student, teacher = pair()
    x = torch.randn(2, 1, 16, 16)
    distiller = FeatureDistiller([term(student="features.7", teacher="features.7", loss="fitnets")], student, teacher)
    torch.manual_seed(5)
    distiller.build(lambda: student(x), lambda: teacher(x), seed=1)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_minilm_relations_term_on_tiny_llama_is_finite_with_gradients(tiny_lm):
    from transformers import AutoModelForCausalLM

    from distil.distill.lm import CausalLMObjective
    from distil.students import make_student

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    student = make_student(teacher, num_layers=2).train()
    spec = term(student="model.layers.{}.self_attn", teacher="model.layers.{}.self_attn", layers=[[1, 3]],
                loss="minilm_relations", num_relation_heads=2)
    ids = torch.randint(2, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # left padding
    batch = {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}
    distiller = FeatureDistiller([spec], student, teacher)
    call = {"input_ids": ids, "attention_mask": attention, "use_cache": False}
    distiller.build(lambda: student(**call), lambda: teacher(**call))
    base = CausalLMObjective(student, Teacher(teacher), LossSpec(alpha=0.5), vocab_size=teacher.config.vocab_size,
                             device=CPU)
    objective = FeatureObjective(base, distiller, mask=lambda b: b["attention_mask"])
    terms = objective.loss(batch)
    value = terms["feat0_minilm_relations"]
    assert torch.isfinite(value) and value > 0

    # The same value from q/k/v captured by independent hooks on the projections.
    seen = {}

    def grab(key):
        return lambda module, args, out: seen.__setitem__(key, out)

    handles = [getattr(m.model.layers[i].self_attn, f"{p}_proj").register_forward_hook(grab((side, p)))
               for side, m, i in (("s", student, 1), ("t", teacher, 3)) for p in "qkv"]
    with torch.no_grad():
        student(**call)
        teacher(**call)
    for h in handles:
        h.remove()
    expected = minilm_relations([seen[("s", p)] for p in "qkv"], [seen[("t", p)] for p in "qkv"],
                                num_relation_heads=2, mask=attention)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-6)

    terms["loss"].backward()
    grads = [p.grad for p in student.model.layers[1].self_attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert hooks(student) == hooks(teacher) == 0
