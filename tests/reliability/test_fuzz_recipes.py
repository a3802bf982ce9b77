"""Fuzzing `distil validate` and `distil estimate`: malformed recipes and overrides never produce a traceback.

Inputs are built three ways: the built-in digits-kd recipe with a few random edits (values of the wrong type or out
of range, deleted keys, unknown keys, whole sections replaced by random structures -- these reach the deep checks,
the memory estimate and the model building), random YAML structures, and raw text that may not be YAML at all; each
comes with random `key=value` overrides. Every input goes through `distil.cli.main` in-process and must end with
exit code 0 or 2 (argparse's usage error is also 2) and no traceback in the output.
"""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distil.cli import main
from distil.config.load import builtin_recipes
from reliability_runs import COUNTS

pytest.importorskip("sklearn", reason="digits-kd needs scikit-learn (pip install 'distil[classic]')")

MAX_EXAMPLES = 250
BASE = yaml.safe_load(builtin_recipes()["digits-kd"].read_text())
KEYS = sorted({"name", "task", "data", "teacher", "student", "train", "loss", "arms", "seed", "model", "arch",
               "hidden_sizes", "channels", "hidden_size", "dropout", "steps", "batch_size", "grad_accum", "subset",
               "lr", "optimizer", "schedule", "warmup_steps", "temperature", "alpha", "divergence", "kind", "path",
               "checkpoint", "eval_size", "eval_every", "save_every", "precision", "device", "method", "source",
               "seq_len", "onpolicy", "generate", "trust_remote_code", "tempreature", "bogus", "", "0"})
WORDS = ["digits", "fashion-mnist", "mlp", "cnn", "hf", "from_teacher", "text", "vision", "adamw", "sgd", "cosine",
         "dkd", "forward_kl", "jsd", "bf16", "cpu", "cuda", "student_alone", "distilled", "classification",
         "causal_lm", "~", "null", "/nonexistent", "[1, 2]", "{a: 1}", "1e400", "-0", "0x10", "nan"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 300), st.sampled_from([0, -1, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-30, 1e30, 0.5, math.inf]),
    st.sampled_from(WORDS), st.text(max_size=8),
)
plausible = st.one_of(st.integers(1, 300), st.floats(0.0, 1.0), st.sampled_from(WORDS))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.integers(), inner, max_size=4),
    max_leaves=10,
)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i))


@st.composite
def edited_base(draw):
    recipe = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([p for p in paths(recipe) if p]))
        parent = recipe
        for part in where[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["nudge", "nudge", "set", "delete", "add"]))
        if action == "nudge":  # a value of the same type, often still valid: reaches the deep checks and estimate
            current = parent[where[-1]]
            if isinstance(current, bool) or not isinstance(current, (int, float, str)):
                parent[where[-1]] = draw(plausible)
            elif isinstance(current, int):
                parent[where[-1]] = draw(st.integers(0, 400))
            elif isinstance(current, float):
                parent[where[-1]] = draw(st.floats(0.0, 2.0))
            else:
                parent[where[-1]] = draw(st.sampled_from(WORDS))
        elif action == "delete":
            del parent[where[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = draw(values)
        else:
            parent[where[-1]] = draw(values)
        if not isinstance(recipe, dict):
            break
    return yaml.safe_dump(recipe, allow_unicode=True)


def override():
    dotted = sorted(".".join(map(str, p)) for p in paths(BASE) if p and all(isinstance(x, str) for x in p))
    key = st.sampled_from(dotted) | st.lists(st.sampled_from(KEYS[1:]), min_size=1, max_size=4).map(".".join)
    value = st.one_of(plausible.map(str), st.text(max_size=10),
                      values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")))
    junk = st.sampled_from(["=", "=1", "a..b=1", ".a=1", "a.=2", "noequals", "train.steps==3", "--", "-x"])
    pair = st.builds(lambda k, v: f"{k}={v}", key, value)
    return st.one_of(pair, pair, pair, pair, pair, junk)


documents = st.one_of(
    st.just(yaml.safe_dump(BASE)), st.just(yaml.safe_dump(BASE)),  # the overrides alone make it malformed (or not)
    edited_base(), edited_base(), edited_base(), edited_base(),
    values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.text(max_size=60),
)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(document=documents, overrides=st.lists(override(), max_size=2), command=st.sampled_from(["validate", "estimate"]))
def test_malformed_recipes_never_produce_a_traceback(document, overrides, command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(document)
    COUNTS["fuzzed"] += 1
    try:
        code = main([command, str(path), *overrides])
    except SystemExit as exc:  # argparse: an override that looks like an option
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    assert "Traceback" not in out + err
    if code == 2:
        assert err.strip(), "exit 2 must say why"

