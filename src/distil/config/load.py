"""Load a recipe: YAML (a path or a built-in name) + dotted overrides -> a validated `Recipe`.

Every problem becomes one line naming the key, what is wrong and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distil.config.schema import Recipe
from distil.errors import ConfigError
from distil.precision import resolve_precision

DEFAULT_RECIPE = "smollm2-distil"


def builtin_recipes() -> dict[str, Path]:
    """Names of the built-in recipes -> their YAML files."""
    folder = resources.files("distil") / "recipes"
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def read_recipe_file(recipe: str | None) -> tuple[dict[str, Any], str]:
    """Read a recipe's raw mapping from a YAML path or a built-in name; returns (mapping, where it came from)."""
    name = recipe or DEFAULT_RECIPE
    builtins = builtin_recipes()
    path = Path(name)
    if name in builtins and not path.exists():
        path = builtins[name]
    elif not path.exists():
        close = difflib.get_close_matches(name, list(builtins), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError([f"recipe '{name}' is neither a file nor a built-in recipe; {hint}`distil recipes` lists them"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {str(exc).splitlines()[0]}"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a text file (a recipe is UTF-8 YAML)"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a recipe must be a YAML mapping of keys to values"])
    return data, str(path)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; values are parsed as YAML scalars/lists (`4`, `true`, `[0, 2]`)."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            problems.append(f"override '{item}': expected key=value, e.g. train.steps=200")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


def load_recipe(recipe: str | None, overrides: list[str] | None = None) -> Recipe:
    data, _ = read_recipe_file(recipe)
    return validate_recipe(apply_overrides(data, list(overrides or [])))


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """The schema's checks, then the rules of the recipe's task (distil.tasks)."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err, data) for err in exc.errors()]) from None
    from distil.tasks import task_of  # the tasks import the schema: read them once the recipe is parsed

    broken = task_of(recipe.task).rules(recipe)
    if broken:
        raise ConfigError([f"recipe: {line}" for line in broken])
    return resolve_precision(recipe)  # `auto` becomes what this machine runs natively, recorded in the run


def _describe(err: dict[str, Any], data: dict[str, Any]) -> str:
    loc = [p for p in err["loc"] if isinstance(p, (str, int))]
    kind = err["type"]
    if kind == "extra_forbidden":
        model_loc, key = loc[:-1], loc[-1]
        valid = _valid_keys(Recipe, model_loc, data)
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(sorted(valid))}"
        return f"{_dotted(_user_loc(model_loc, data) + [key])}: unknown key; {hint}"
    where = _dotted(_user_loc(loc, data)) or "recipe"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        key = str(ctx.get("discriminator", "kind")).strip("'")
        return f"{where}: unknown {key} '{ctx.get('tag')}'; expected one of {ctx.get('expected_tags')}"
    shown = err.get("input")
    got = f" (got {shown!r})" if shown is not None and not isinstance(shown, (dict, list)) else ""
    return f"{where}: {err['msg'].removeprefix('Value error, ')}{got}"


def _user_loc(loc: list, data: dict[str, Any]) -> list:
    """Drop the union-tag entries pydantic adds to a location (`student.model.mlp.x` -> `student.model.x`)."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part not in node and isinstance(part, str) and part in _tags(node):
            continue
        out.append(part)
        node = node.get(part) if isinstance(node, dict) else (node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    return out


def _tags(node: dict[str, Any]) -> set[str]:
    return {str(v) for k, v in node.items() if k in ("arch", "kind")}


def _dotted(loc: list) -> str:
    return ".".join(str(p) for p in loc)


def _valid_keys(model: type[BaseModel], loc: list, data: dict[str, Any]) -> list[str]:
    """Field names of the model that sits at `loc`, following unions by their tag and lists by item type."""
    current: Any = model
    for part in loc:
        current = _unwrap(current, part)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _unwrap(current: Any, part: Any) -> Any:
    if isinstance(current, type) and issubclass(current, BaseModel):
        field = current.model_fields.get(str(part))
        return field.annotation if field else None
    origin = typing.get_origin(current)
    args = typing.get_args(current)
    if origin is typing.Annotated:
        return _unwrap(args[0], part)
    if origin in (typing.Union, types.UnionType):
        for arg in args:  # a union tag (e.g. 'mlp') selects the member whose Literal matches
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                for name in ("arch", "kind"):
                    f = arg.model_fields.get(name)
                    if f and part in typing.get_args(f.annotation):
                        return arg
        members = [a for a in args if a is not type(None)]
        return _unwrap(members[0], part) if len(members) == 1 else None
    if origin is list and isinstance(part, int):
        return args[0]
    return None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
