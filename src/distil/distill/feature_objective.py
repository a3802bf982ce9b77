"""Feature, attention and relation terms on top of any objective: taps on both models, layer mapping, projectors.

    distiller = FeatureDistiller(terms, student, teacher_model)                  # names resolved: errors now
    distiller.build(lambda: student(x), lambda: teacher_model(x))                # shapes probed, projectors built
    objective = FeatureObjective(ClassifierObjective(...), distiller)            # adds the terms to its loss

The wrapped objective runs both models as usual; forward hooks installed only for the duration of its `loss` call
record the named modules' outputs (or the q/k/v projections of attention modules, through AttentionRecorder), and
each term is averaged over its layer pairs and added with its weight. The projectors live in
`objective.modules["projectors"]`: optimised and checkpointed with the student, never part of the saved student.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distil.distill.attention import AttentionRecorder
from distil.distill.mapping import layer_mapping
from distil.distill.projectors import FeaturePair, Projectors, build_projectors
from distil.distill.taps import Taps, resolve_module_names
from distil.errors import DistilError
from distil.losses.attention import attention_kl, minilm_relations
from distil.losses.features import attention_transfer, fitnets_hint, hidden_cosine, hidden_mse
from distil.losses.relations import rkd_angle, rkd_distance
from distil.train.objective import Objective


def layer_count(model: nn.Module, template: str) -> int:
    """How many layers a template such as `encoder.layer.{}` names: indices 0, 1, ... while the module exists."""
    names = {name for name, _ in model.named_modules()}
    n = 0
    while template.format(n) in names:
        n += 1
    return n


PROJECTED_LOSSES = ("mse", "cosine", "fitnets")  # terms that may put a learned projector on the student's side
ATTENTION_LOSSES = ("attention_kl", "minilm_relations")  # terms that read attention modules' projections


@dataclass(frozen=True)
class FeatureTerm:
    """One intermediate-layer term: weight * loss(student module, teacher module). The fields are those of a
    recipe's `loss.features` entries (distil.config.schema.FeatureTermSpec documents each)."""

    student: str  # module name, glob, or layer template with one {}
    teacher: str
    loss: str  # mse, cosine, fitnets, at, attention_kl, minilm_relations, rkd_distance, rkd_angle
    weight: float = 1.0
    layers: str | list[tuple[int, int]] | None = None  # layer templates: uniform, last_of_block or explicit pairs
    projector: str | None = None  # auto, always or never (mse, cosine, fitnets)
    capture: str = "output"  # or "input"
    p: float = 2.0  # at: the exponent of the attention map
    head_map: str = "average"  # attention_kl: average or per_head
    num_relation_heads: int | None = None  # minilm_relations


@dataclass
class Term:
    """One recipe term with its layer pairs resolved to module names."""

    index: int
    spec: FeatureTerm
    pairs: list[tuple[str, str]]
    mapping: list[tuple[int, int]] | None = None
    shapes: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    relation_heads: int | None = None

    @property
    def key(self) -> str:
        return f"{self.index}:{self.spec.loss}"

    def pair_key(self, s: str, t: str) -> str:
        # Each term gets its own projectors, even when two terms tap the same layers.
        return f"{self.index}/{s}->{t}"


def _resolve(i: int, spec: FeatureTerm, student: nn.Module, teacher: nn.Module) -> Term:
    where = f"loss.features[{i}] ({spec.loss})"
    try:
        if "{}" in spec.student:
            depths = []
            for who, model, template in (("student", student, spec.student), ("teacher", teacher, spec.teacher)):
                n = layer_count(model, template)
                if n == 0:  # no layer 0: let the name check explain, with close matches
                    resolve_module_names(model, template.format(0))
                depths.append(n)
            mapping = layer_mapping(spec.layers or "uniform", depths[0], depths[1])
            pairs = [(spec.student.format(s), spec.teacher.format(t)) for s, t in mapping]
            return Term(i, spec, pairs, mapping)
        s_names = resolve_module_names(student, spec.student)
        t_names = resolve_module_names(teacher, spec.teacher)
    except DistilError as exc:
        raise DistilError(f"{where}: {exc}") from None
    if len(s_names) != len(t_names):
        raise DistilError(f"{where}: student {spec.student!r} matches {len(s_names)} modules but teacher "
                          f"{spec.teacher!r} matches {len(t_names)}; patterns are paired in order, so they must match "
                          "as many modules (or use layer templates with '{}' and layers: uniform)")
    return Term(i, spec, list(zip(s_names, t_names)))


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    # A [batch, seq] mask applies to per-token features [batch, seq, width]; feature maps take none.
    return mask if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape) else None


class FeatureDistiller:
    """The resolved terms of a recipe, their projectors, and the hooks that feed them."""

    def __init__(self, specs: Sequence[FeatureTerm], student: nn.Module, teacher: nn.Module) -> None:
        if not specs:
            raise DistilError("no feature terms given; add entries to loss.features")
        self.student, self.teacher = student, teacher
        self.terms = [_resolve(i, spec, student, teacher) for i, spec in enumerate(specs)]
        self.projectors = Projectors()
        self._attention = [t for t in self.terms if t.spec.loss in ATTENTION_LOSSES]
        names = lambda side, terms: list(dict.fromkeys(p[side] for t in terms for p in t.pairs))  # noqa: E731
        try:  # AttentionRecorder checks the names are attention modules it can read
            self._s_attn = AttentionRecorder(student, names(0, self._attention)) if self._attention else None
            self._t_attn = AttentionRecorder(teacher, names(1, self._attention)) if self._attention else None
        except DistilError as exc:
            raise DistilError(f"loss.features ({', '.join(t.spec.loss for t in self._attention)}): {exc}") from None
        plain = [t for t in self.terms if t.spec.loss not in ATTENTION_LOSSES]
        self._taps: dict[tuple[int, str], list[str]] = {}
        for side in (0, 1):
            for capture in ("output", "input"):
                chosen = names(side, [t for t in plain if t.spec.capture == capture])
                if chosen:
                    self._taps[(side, capture)] = chosen
        self._live: dict[tuple[int, str], Taps] = {}

    # -- pre-flight ---------------------------------------------------------------------------------------------
    def build(self, run_student: Callable[[], Any], run_teacher: Callable[[], Any], *, seed: int = 0) -> Projectors:
        """Run both models once on an example, check every pair's shapes, and create the projectors.

        Projectors are initialised from their own generator seeded by `seed`, so the student's RNG stream (dropout,
        data order) is the same as in arms without them."""
        modes = (self.student.training, self.teacher.training)
        self.student.eval()
        self.teacher.eval()
        try:
            with torch.no_grad(), self.capture():
                run_student()
                run_teacher()
                for term in self.terms:
                    self._check(term)
        finally:
            self.student.train(modes[0])
            self.teacher.train(modes[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projectors = Projectors()
            for term in self.terms:
                if term.spec.loss not in PROJECTED_LOSSES:
                    continue
                mode = term.spec.projector or ("always" if term.spec.loss == "fitnets" else "auto")
                pairs = [FeaturePair(f"{term.index}/{s}", t, *term.shapes[(s, t)]) for s, t in term.pairs]
                try:
                    if mode == "never":
                        build_projectors(pairs, mode="never")  # only checks: every shape must already agree
                    for pair in pairs:
                        if mode == "always" or tuple(pair.student_shape) != tuple(pair.teacher_shape):
                            projectors.add(pair)
                except DistilError as exc:
                    raise DistilError(f"loss.features[{term.index}] ({term.spec.loss}): {exc}") from None
        param = next(self.student.parameters(), None)
        self.projectors = projectors.to(param.device) if param is not None else projectors
        return self.projectors

    def _check(self, term: Term) -> None:
        where = f"loss.features[{term.index}] ({term.spec.loss})"
        for s, t in term.pairs:
            if term.spec.loss in ATTENTION_LOSSES:
                sq, tq = self._s_attn.projections(s), self._t_attn.projections(t)  # type: ignore[union-attr]
                s_shape, t_shape = tuple(sq[0].shape), tuple(tq[0].shape)
                if term.spec.loss == "minilm_relations":
                    self._relation_heads(term, s, [x.shape[-1] for x in sq], [x.shape[-1] for x in tq])
                elif s_shape[:2] != t_shape[:2]:
                    raise DistilError(f"{where}: {s} and {t} see different batch/sequence shapes")
            else:
                s_shape = tuple(self._value(0, term, s).shape)
                t_shape = tuple(self._value(1, term, t).shape)
                if term.spec.loss == "at" and (len(s_shape) < 3 or s_shape[2:] != t_shape[2:]):
                    raise DistilError(f"{where}: attention transfer needs feature maps of the same spatial size: "
                                      f"student {s} {list(s_shape)} vs teacher {t} {list(t_shape)}; pick layers at "
                                      "the same resolution")
                if term.spec.loss in ("rkd_distance", "rkd_angle") and s_shape[0] != t_shape[0]:
                    raise DistilError(f"{where}: {s} {list(s_shape)} and {t} {list(t_shape)} differ in batch size")
            term.shapes[(s, t)] = (s_shape, t_shape)

    def _relation_heads(self, term: Term, s: str, s_widths: list[int], t_widths: list[int]) -> None:
        heads = term.spec.num_relation_heads
        if heads is None:
            module = dict(self.student.named_modules())[s]
            heads = (getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
                     or getattr(getattr(module, "config", None), "num_attention_heads", None))
        bad = [w for w in s_widths + t_widths if not heads or w % heads]
        if bad:
            raise DistilError(f"loss.features[{term.index}] (minilm_relations): {heads} relation heads do not divide "
                              f"the q/k/v widths {sorted(set(s_widths + t_widths))} of {s} and its teacher layer; "
                              "set num_relation_heads to a common divisor")
        term.relation_heads = int(heads)

    def describe(self) -> str:
        """The layer mapping and projectors in use, for the run log."""
        lines = []
        for term in self.terms:
            layers = term.spec.layers or "uniform"
            how = "" if term.mapping is None else f", {layers if isinstance(layers, str) else 'explicit'} mapping"
            if term.spec.loss == "minilm_relations":
                how += f", {term.relation_heads} relation heads"
            lines.append(f"feature term {term.index}: {term.spec.loss} x {term.spec.weight:g}{how}")
            for s, t in term.pairs:
                proj = self.projectors.describe()
                kind = next((p["kind"] for p in proj if p["pair"] == term.pair_key(s, t)), None)
                extra = f"  ({kind} projector)" if kind else ""
                lines.append(f"  student {s} -> teacher {t}{extra}")
        return "\n".join(lines)

    # -- capture ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator[FeatureDistiller]:
        """Hooks on both models for the duration of the block; removed on exit, also on an exception."""
        with contextlib.ExitStack() as stack:
            for (side, capture), names in self._taps.items():
                model = self.student if side == 0 else self.teacher
                self._live[(side, capture)] = stack.enter_context(
                    Taps(model, names, capture=capture, detach=side == 1))  # type: ignore[arg-type]
            for rec in (self._s_attn, self._t_attn):
                if rec is not None:
                    rec.clear()
                    stack.enter_context(rec)
            try:
                yield self
            finally:
                self._live.clear()

    def _value(self, side: int, term: Term, name: str) -> torch.Tensor:
        return self._live[(side, term.spec.capture)][name]

    def losses(self, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each term's value (averaged over its layer pairs), from the forwards run inside `capture()`."""
        out = {}
        for term in self.terms:
            values = [self._pair_loss(term, s, t, mask) for s, t in term.pairs]
            out[term.key] = torch.stack(values).mean()
        return out

    def _pair_loss(self, term: Term, s: str, t: str, mask: torch.Tensor | None) -> torch.Tensor:
        loss = term.spec.loss
        if loss == "attention_kl":
            s_probs = self._s_attn.probs(s, padding_mask=mask)  # type: ignore[union-attr]
            with torch.no_grad():
                t_probs = self._t_attn.probs(t, padding_mask=mask)  # type: ignore[union-attr]
            return attention_kl(s_probs, t_probs, mask=mask, head_map=term.spec.head_map)
        if loss == "minilm_relations":
            t_qkv = [x.detach() for x in self._t_attn.projections(t)]  # type: ignore[union-attr]
            return minilm_relations(self._s_attn.projections(s), t_qkv,  # type: ignore[union-attr]
                                    num_relation_heads=term.relation_heads or 1, mask=mask)
        x, y = self._value(0, term, s), self._value(1, term, t)
        if loss in PROJECTED_LOSSES:
            x = self.projectors.project(f"{term.index}/{s}->{t}", x)
            if loss == "fitnets":
                return fitnets_hint(x, y)
            fn = hidden_mse if loss == "mse" else hidden_cosine
            return fn(x, y, mask=_mask_for(x, mask))
        if loss == "at":
            return attention_transfer(x, y, p=term.spec.p)
        return (rkd_distance if loss == "rkd_distance" else rkd_angle)(x, y)


class FeatureObjective(Objective):
    """Any objective plus feature terms: loss = base loss + sum_i weight_i * term_i.

    `mask(batch)` gives the [batch, seq] mask of real tokens for sequence models (None for images)."""

    def __init__(self, base: Any, distiller: FeatureDistiller,
                 mask: Callable[[Any], torch.Tensor | None] | None = None) -> None:
        self.base, self.distiller, self._mask = base, distiller, mask
        self.unit = base.unit
        self.modules = dict(base.modules)
        if len(distiller.projectors):
            self.modules["projectors"] = distiller.projectors

    def prepare(self, batches: list[Any], step: int) -> list[Any]:
        return self.base.prepare(batches, step)

    def teachers(self) -> dict[str, nn.Module]:
        return self.base.teachers()

    def weight(self, batch: Any) -> int:
        return self.base.weight(batch)

    def loss(self, batch: Any) -> dict[str, torch.Tensor]:
        with self.distiller.capture():
            terms = dict(self.base.loss(batch))
            mask = self._mask(batch) if self._mask is not None else None
            if mask is not None:
                param = next(self.distiller.student.parameters())
                mask = mask.to(param.device)
            values = self.distiller.losses(mask)
        total = terms["loss"]
        for term in self.distiller.terms:
            value = values[term.key]
            terms[f"feat{term.index}_{term.spec.loss}"] = value
            total = total + term.spec.weight * value
        terms["loss"] = total
        return terms
