import pytest
import torch
from torch import nn

from distil.config.schema import LossSpec
from distil.distill.objectives import ClassifierObjective, soft_term
from distil.distill.pair import Teacher, check_pair
from distil.errors import DistilError
from distil.losses import distillation_loss


def test_teacher_is_frozen_and_builds_no_graph():
    teacher = Teacher(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)))
    teacher.train()
    out = teacher(torch.randn(5, 3, requires_grad=True))
    assert not out.requires_grad and not teacher.training and not teacher.model.training
    teacher.model.train()  # even when the inner model is switched directly, the forward runs in eval mode
    x = torch.randn(5, 3)
    assert torch.equal(teacher(x), teacher(x))


def test_pair_check_names_the_class_counts():
    with pytest.raises(DistilError, match="student predicts 3 classes but teacher predicts 4"):
        check_pair(nn.Linear(2, 3), Teacher(nn.Linear(2, 4)), (torch.randn(1, 2),))


def test_objective_equals_the_classic_distillation_loss():
    torch.manual_seed(0)
    student, teacher = nn.Linear(6, 5), Teacher(nn.Linear(6, 5))
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    spec = LossSpec(alpha=0.9, temperature=4.0)
    terms = ClassifierObjective(student, teacher, spec, torch.device("cpu")).loss((x, y))
    expected = distillation_loss(student(x), teacher(x), y, alpha=0.9, temperature=4.0)
    torch.testing.assert_close(terms["loss"], expected)


def test_soft_term_scales_by_t_squared_only_when_asked():
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    scaled = soft_term(s, t, None, LossSpec(temperature=3.0))
    plain = soft_term(s, t, None, LossSpec(temperature=3.0, scale_by_t2=False))
    torch.testing.assert_close(scaled, plain * 9)
