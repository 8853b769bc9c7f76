"""Typed recipes: TOML + --set overrides, one-line errors naming key and file."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mtl_edge.errors import ConfigError
from mtl_edge.settings import apply_overrides, config_to_dict, from_dict, parse_options, to_toml
from mtl_edge.train.config import Recipe, load_recipe, packaged_recipes, recipe_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OWN_RECIPES = ["demo", "omniglot-cpu", "mini-cpu", "mtl-pytorch", "mtl-tf", "mini-resnet12-gpu"]


def load_config(cls, path=None, overrides=()):  # noqa: ANN001, ANN201
    """Any dataclass tree from a TOML file (the generic loader under `load_recipe`)."""
    from mtl_edge.settings import read_toml

    doc = {} if path is None else read_toml(recipe_path(path))
    return from_dict(cls, apply_overrides(doc, overrides), str(path))


@dataclass
class Inner:
    rate: float = 0.1
    sizes: tuple[int, ...] = (1, 2)
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    extra: dict = field(default_factory=dict)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_generic_tree_with_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "flag = true\n[inner]\nrate = 1\nsizes = [3]\n")
    cfg = load_config(Outer, path, ["inner.name=abc", "extra.k={a = 1}", "inner.sizes=[4, 5]"])
    assert cfg.flag is True
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.sizes == (4, 5)
    assert cfg.inner.name == "abc"
    assert cfg.extra == {"k": {"a": 1}}


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("[inner]\nrate = 'fast'\n", [], "inner.rate"),
        ("[inner]\nspeed = 1\n", [], "inner.speed"),
        ("", ["inner.sizes=[1, 'x']"], "inner.sizes[1]"),
        ("", ["flag=1"], "flag"),
        ("", ["nosuch.table=1"], "nosuch"),
    ],
)
def test_bad_key_or_type_names_key_and_file(
    tmp_path: Path, text: str, overrides: list[str], needle: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path, overrides)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_bad_toml_and_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Outer, write(tmp_path, "[inner\n"))
    with pytest.raises(ConfigError, match="no such file or packaged recipe"):
        load_config(Outer, "no-such-recipe")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_override_values_parse_as_toml_or_string() -> None:
    doc = apply_overrides({"a": {"b": 1}}, ["a.b=2e-3", "a.c=true", "a.d=hello", "x.y='s'"])
    assert doc == {"a": {"b": 2e-3, "c": True, "d": "hello"}, "x": {"y": "s"}}


def test_roundtrip_through_toml() -> None:
    cfg = load_recipe(None, ["eval.shots=[1, 5, 10]", "data.options={size = 32}"])
    doc = tomllib.loads(to_toml(config_to_dict(cfg)))
    assert from_dict(Recipe, doc) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pretrain.schedule=linear", "pretrain.schedule"),
        ("meta.inner_lr=0", "meta.inner_lr"),
        ("meta.ways=1", "meta.ways"),
        ("hard_tasks.every_n_batches=0", "hard_tasks.every_n_batches"),
        ("joint.beta=2.0", "joint.beta"),
        ("joint.meta=protonet", "joint.meta"),
        ("eval.heads=['knn']", "eval.heads"),
        ("runtime.amp=fp8", "runtime.amp"),
        ("data.kind=zip", "data.kind"),
        ("model.args={in_channels = 1}", "in_channels"),
    ],
)
def test_every_table_validates_itself(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("demo", [override])
    assert needle in str(info.value) and "demo.toml" in str(info.value)


def test_one_override_parser_for_options() -> None:
    assert parse_options(["width=8", "name=x", "sizes=[1, 2]"]) == {
        "width": 8,
        "name": "x",
        "sizes": [1, 2],
    }
    with pytest.raises(ConfigError, match=r"--backbone-arg 'w'.*width=8"):
        parse_options(["w"], "--backbone-arg", "width=8")


@pytest.mark.parametrize("name", packaged_recipes())
def test_packaged_recipes_load_and_check(name: str) -> None:
    """Every packaged recipe, the joint and pipeline ones included, is one `Recipe`."""
    cfg = load_recipe(name)
    assert cfg.model.input_preprocess.channels == cfg.model.args.get("in_channels", 3)
    assert set(OWN_RECIPES) <= set(packaged_recipes())
