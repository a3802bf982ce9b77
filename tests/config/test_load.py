import pytest

from distil.config.load import apply_overrides, builtin_recipes, load_recipe, validate_recipe
from distil.config.schema import LossSpec
from distil.errors import ConfigError
from distil.losses import DIVERGENCES


def digits(**changes):
    data, _ = __import__("distil.config.load", fromlist=["read_recipe_file"]).read_recipe_file("digits-kd")
    return data


def problems_of(overrides, recipe="digits-kd"):
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, overrides)
    return info.value.problems


def test_builtin_recipes_validate():
    assert {"digits-kd", "fashion-mnist-kd"} <= set(builtin_recipes())
    for name in builtin_recipes():
        assert load_recipe(name).name == name


def test_overrides_are_parsed_as_yaml_values():
    recipe = load_recipe("digits-kd", ["train.steps=7", "loss.temperature=4", "loss.scale_by_t2=false",
                                       "student.model.hidden_sizes=[8, 4]", "output_dir=/tmp/x"])
    assert recipe.train.steps == 7 and recipe.loss.temperature == 4.0 and recipe.loss.scale_by_t2 is False
    assert recipe.student.model.hidden_sizes == [8, 4] and recipe.output_dir == "/tmp/x"


def test_unknown_key_suggests_the_closest():
    assert problems_of(["loss.temprature=3"]) == ["loss.temprature: unknown key; did you mean 'temperature'?"]


def test_unknown_key_inside_a_union_member_is_located_without_the_tag():
    (problem,) = problems_of(["student.model.hiden_sizes=[3]"])
    assert problem == "student.model.hiden_sizes: unknown key; did you mean 'hidden_sizes'?"


def test_wrong_type_negative_temperature_and_alpha_range_each_give_one_line():
    found = problems_of(["train.steps=many", "loss.temperature=-1", "loss.alpha=1.5"])
    assert len(found) == 3
    assert any(p.startswith("train.steps:") and "'many'" in p for p in found)
    assert any(p.startswith("loss.temperature:") and "greater than 0" in p for p in found)
    assert any(p.startswith("loss.alpha:") and "less than or equal to 1" in p for p in found)


def test_unknown_arch_names_the_choices():
    (problem,) = problems_of(["student.model.arch=transformer"])
    assert problem.startswith("student.model: unknown arch 'transformer'") and "'mlp'" in problem


def test_missing_required_key():
    data = digits()
    del data["train"]
    with pytest.raises(ConfigError) as info:
        validate_recipe(data)
    assert info.value.problems == ["train: required key is missing"]


def test_malformed_override_and_unknown_recipe():
    assert "expected key=value" in problems_of(["train.steps"])[0]
    assert "did you mean 'digits-kd'" in problems_of([], recipe="digit-kd")[0]


def test_override_into_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="'seed' is not a mapping"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_warmup_longer_than_training_is_refused():
    (problem,) = problems_of(["train.warmup_steps=10000"])
    assert problem.startswith("train: warmup_steps (10000) exceeds steps")


def test_schema_divergences_match_the_loss_table():
    allowed = set(LossSpec.model_fields["divergence"].annotation.__args__)
    assert allowed == set(DIVERGENCES) | {"dkd"}
