from fractions import Fraction

import pytest

from distil.distill.mapping import (format_mapping, last_of_block_mapping, layer_mapping, uniform_mapping,
                                    validate_mapping)
from distil.errors import DistilError


def _round_half_up(x: Fraction) -> int:
    return int(x + Fraction(1, 2)) if x >= 0 else -int(-x + Fraction(1, 2))


@pytest.mark.parametrize("ls", range(2, 13))
@pytest.mark.parametrize("lt", range(1, 25, 3))
def test_uniform_matches_the_formula(ls, lt):
    want = [(i, _round_half_up(Fraction(i * (lt - 1), ls - 1))) for i in range(ls)]
    got = uniform_mapping(ls, lt)
    assert got == want
    assert got[0] == (0, 0) and got[-1] == (ls - 1, lt - 1)
    assert all(a[1] <= b[1] for a, b in zip(got, got[1:]))


def test_uniform_known_cases():
    assert uniform_mapping(4, 12) == [(0, 0), (1, 4), (2, 7), (3, 11)]
    assert uniform_mapping(3, 6) == [(0, 0), (1, 3), (2, 5)]  # 2.5 rounds half up, not to even
    assert uniform_mapping(1, 12) == [(0, 11)]
    assert uniform_mapping(6, 6) == [(i, i) for i in range(6)]


def test_last_of_block():
    assert last_of_block_mapping(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert last_of_block_mapping(6, 12) == [(i, 2 * i + 1) for i in range(6)]
    assert last_of_block_mapping(1, 6) == [(0, 5)]
    assert last_of_block_mapping(4, 10) == [(0, 1), (1, 4), (2, 6), (3, 9)]
    for ls in range(1, 9):
        for lt in range(ls, 20):
            got = [t for _, t in last_of_block_mapping(ls, lt)]
            sizes = [b - a for a, b in zip([-1] + got, got)]
            assert got[-1] == lt - 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(DistilError, match="no deeper"):
        last_of_block_mapping(5, 4)


def test_explicit_pairs_validated():
    assert layer_mapping([[0, 1], [1, 3]], 2, 4) == [(0, 1), (1, 3)]
    assert layer_mapping("uniform", 2, 4) == [(0, 0), (1, 3)]
    assert layer_mapping("last_of_block", 2, 4) == [(0, 1), (1, 3)]
    with pytest.raises(DistilError, match="student layer 2 is out of range; the student has 2 layers"):
        validate_mapping([(2, 0)], 2, 4)
    with pytest.raises(DistilError, match="teacher layer 4 is out of range; the teacher has 4 layers"):
        validate_mapping([(0, 4)], 2, 4)
    with pytest.raises(DistilError, match="out of range"):
        validate_mapping([(-1, 0)], 2, 4)
    with pytest.raises(DistilError, match="twice"):
        validate_mapping([(0, 0), (0, 0)], 2, 4)
    with pytest.raises(DistilError, match="pair of integers"):
        validate_mapping([(0, 1.5)], 2, 4)
    with pytest.raises(DistilError, match="empty"):
        validate_mapping([], 2, 4)
    with pytest.raises(DistilError, match="unknown layer mapping 'uniformm'"):
        layer_mapping("uniformm", 2, 4)
    with pytest.raises(DistilError, match="at least one layer"):
        uniform_mapping(0, 4)


def test_format_for_the_run_log():
    text = format_mapping([(0, 0), (1, 11)])
    assert text == "student layer 0 -> teacher layer 0\nstudent layer 1 -> teacher layer 11"
    text = format_mapping([(0, 2), (10, 11)], student_name="model.layers.{}", teacher_name="bert.encoder.layer.{}")
    assert text.splitlines() == ["model.layers.0  -> bert.encoder.layer.2", "model.layers.10 -> bert.encoder.layer.11"]
