"""Which student layer learns from which teacher layer.

Layers are 0-based indices over the transformer blocks (or any stack of layers); embeddings are not a layer here.
A mapping is a list of (student_layer, teacher_layer) pairs, in student order.
"""

from __future__ import annotations

from collections.abc import Sequence

from distil.errors import DistilError

STRATEGIES = ("uniform", "last_of_block")


def _check_depths(num_student: int, num_teacher: int) -> None:
    for who, n in (("student", num_student), ("teacher", num_teacher)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DistilError(f"the {who} must have at least one layer to map, got {n!r}")


def uniform_mapping(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Student layer i -> teacher layer round(i * (Lt - 1) / (Ls - 1)): first to first, last to last, evenly between.

    Rounding is half-up in exact integer arithmetic (Python's round() would send 2.5 to 2). A one-layer student maps
    to the teacher's last layer. A student deeper than its teacher maps several layers to one teacher layer.
    """
    _check_depths(num_student, num_teacher)
    if num_student == 1:
        return [(0, num_teacher - 1)]
    den = num_student - 1
    return [(i, (2 * i * (num_teacher - 1) + den) // (2 * den)) for i in range(num_student)]


def last_of_block_mapping(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Split the teacher into Ls consecutive blocks and map student layer i to the last layer of block i.

    Block i ends at teacher layer floor((i + 1) * Lt / Ls) - 1, so blocks are equal when Ls divides Lt (12 -> 4:
    2, 5, 8, 11) and differ by at most one layer otherwise. The student's last layer always maps to the teacher's last.
    """
    _check_depths(num_student, num_teacher)
    if num_student > num_teacher:
        raise DistilError(f"last_of_block needs a student no deeper than the teacher, got {num_student} student "
                          f"and {num_teacher} teacher layers; use 'uniform' or explicit pairs")
    return [(i, (i + 1) * num_teacher // num_student - 1) for i in range(num_student)]


def validate_mapping(
    pairs: Sequence[Sequence[int]], num_student: int, num_teacher: int
) -> list[tuple[int, int]]:
    """Check explicit (student, teacher) pairs against both depths; return them as a list of int tuples."""
    _check_depths(num_student, num_teacher)
    if not pairs:
        raise DistilError("the layer mapping is empty; give at least one [student_layer, teacher_layer] pair")
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for pair in pairs:
        if (not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise DistilError(f"layer mapping entry {pair!r} is not a [student_layer, teacher_layer] pair of integers")
        s, t = int(pair[0]), int(pair[1])
        if not 0 <= s < num_student:
            raise DistilError(f"layer mapping pair [{s}, {t}]: student layer {s} is out of range; "
                              f"the student has {num_student} layers (0..{num_student - 1})")
        if not 0 <= t < num_teacher:
            raise DistilError(f"layer mapping pair [{s}, {t}]: teacher layer {t} is out of range; "
                              f"the teacher has {num_teacher} layers (0..{num_teacher - 1})")
        if (s, t) in seen:
            raise DistilError(f"layer mapping pair [{s}, {t}] is listed twice; remove the duplicate")
        seen.add((s, t))
        out.append((s, t))
    return out


def layer_mapping(
    spec: str | Sequence[Sequence[int]], num_student: int, num_teacher: int
) -> list[tuple[int, int]]:
    """A mapping from a strategy name ("uniform", "last_of_block") or explicit pairs, validated."""
    if isinstance(spec, str):
        if spec == "uniform":
            return uniform_mapping(num_student, num_teacher)
        if spec == "last_of_block":
            return last_of_block_mapping(num_student, num_teacher)
        raise DistilError(f"unknown layer mapping {spec!r}; use one of {', '.join(STRATEGIES)} "
                          "or a list of [student_layer, teacher_layer] pairs")
    return validate_mapping(spec, num_student, num_teacher)


def format_mapping(
    pairs: Sequence[tuple[int, int]],
    *,
    student_name: str = "student layer {}",
    teacher_name: str = "teacher layer {}",
) -> str:
    """The mapping as aligned lines for the run log, e.g. `student layer 0 -> teacher layer 0`.

    `student_name` / `teacher_name` are format strings, e.g. "model.layers.{}" to print module names instead."""
    left = [student_name.format(s) for s, _ in pairs]
    width = max((len(x) for x in left), default=0)
    return "\n".join(f"{a.ljust(width)} -> {teacher_name.format(t)}" for a, (_, t) in zip(left, pairs))
