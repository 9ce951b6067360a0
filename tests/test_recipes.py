"""Recipes ship inside the package: listed, copied, named in --config, read by the demo, present in a wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from adgen.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TRAINING_RECIPES = {"smollm2-135m", "smollm2-135m-adgen", "smollm2-135m-dpo", "demo-smollm2-135m",
                    "llama3-8b-lora", "llama3-8b-qlora", "llama3-8b-ptuning"}


def test_every_training_recipe_is_listed_and_loads_as_a_train_config():
    from adgen.recipes import list_recipes
    from adgen.train.config import load_train_config

    recipes = {r.name: r for r in list_recipes()}
    assert TRAINING_RECIPES <= {n for n, r in recipes.items() if r.kind == "train"}
    assert {"accelerate/fsdp", "accelerate/ddp-cpu", "deepspeed/zero3"} <= set(recipes)
    for name in TRAINING_RECIPES:
        cfg = load_train_config(name)  # by name, not path
        assert cfg.model and recipes[name].summary, name


def test_config_flag_takes_a_recipe_name_or_a_path_and_says_what_exists(tmp_path):
    from adgen.commands.train import build_config
    from adgen.cli import build_parser

    args = build_parser().parse_args(["train", "--config", "smollm2-135m-adgen", "lr=1e-4"])
    cfg = build_config(args)
    assert cfg.method == "full" and cfg.top_layers == 12 and cfg.lr == 1e-4
    args = build_parser().parse_args(["train", "--config", "configs/smollm2-135m-adgen.yaml"])
    assert build_config(args).top_layers == 12
    with pytest.raises(ConfigError, match="smollm2-135m-adgen"):  # the error lists the shipped ones
        build_config(build_parser().parse_args(["train", "--config", "no-such-recipe"]))
    with pytest.raises(ConfigError, match="no such config file"):
        build_config(build_parser().parse_args(["train", "--config", str(tmp_path / "missing.yaml")]))


def test_recipes_copy_writes_the_recipe_and_keeps_an_existing_file(tmp_path, capsys):
    from adgen.cli import main
    from adgen.recipes import find_recipe

    dest = tmp_path / "mine.yaml"
    assert main(["recipes", "copy", "smollm2-135m-adgen", str(dest)]) == 0
    assert dest.read_bytes() == find_recipe("smollm2-135m-adgen").read_bytes()
    dest.write_text("lr: 1.0e-3\n")
    assert main(["recipes", "copy", "smollm2-135m-adgen", str(dest)]) == 2  # exists: refused, kept
    assert dest.read_text() == "lr: 1.0e-3\n" and "--overwrite" in capsys.readouterr().err
    assert main(["recipes", "list"]) == 0 and "smollm2-135m-adgen" in capsys.readouterr().out


def test_the_demo_trains_with_its_shipped_recipe(tmp_path):
    import yaml

    from adgen.demo import DEMO_RECIPE, DemoConfig, demo_train_config
    from adgen.recipes import find_recipe

    recipe = yaml.safe_load(find_recipe(DEMO_RECIPE).read_text(encoding="utf-8"))
    cfg = demo_train_config(DemoConfig(), tmp_path / "train.json", tmp_path / "dev.json", tmp_path / "out", 4.0)
    for key in ("method", "top_layers", "lr", "batch_size", "max_length", "warmup_steps"):
        assert getattr(cfg, key) == recipe[key], key
    assert cfg.max_minutes == 4.0 and cfg.train_data == str(tmp_path / "train.json")


def test_a_built_wheel_holds_the_recipes(tmp_path):
    """`pip install .` (not editable) must bring the recipes: they are package data."""
    # the package and its build description only: building in the clone would walk runs/ and .venv too
    src = tmp_path / "src"
    shutil.copytree(REPO / "adgen", src / "adgen", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # setuptools' PEP 517 hook, what `pip install .` calls (pip itself would also consult the package index)
    subprocess.run([sys.executable, "-c", f"import setuptools.build_meta as b; b.build_wheel({str(tmp_path)!r})"],
                   cwd=src, check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("adgen-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in TRAINING_RECIPES:
        assert f"adgen/recipes/{name}.yaml" in names, name
    assert "adgen/recipes/accelerate/fsdp.yaml" in names and "adgen/recipes/deepspeed/zero3.json" in names
    # the other package data: `adgen plan`'s shipped architecture, the Advertising Law's term list
    assert "adgen/resources/models/llama3-8b-instruct.json" in names and "adgen/plan/__init__.py" in names
    assert "adgen/resources/compliance/ad_law_terms.json" in names


def test_train_help_lists_every_config_key_with_the_recipe_s_values(capsys):
    import dataclasses

    from adgen.cli import main
    from adgen.train.config import TrainConfig

    with pytest.raises(SystemExit) as done:
        main(["train", "--config", "smollm2-135m-adgen", "lr=3e-4", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("lora", "prefix")]
    keys += [f"lora.{f.name}" for f in dataclasses.fields(TrainConfig().lora)]
    keys += [f"prefix.{f.name}" for f in dataclasses.fields(TrainConfig().prefix)]
    for key in keys:
        assert f"\n  {key} (" in text, key
    assert "  top_layers (int | None) = 12" in text and "  lr (float) = 0.0003" in text  # the recipe + override
    assert "  method (lora | qlora | dora | prefix | full) = 'full'" in text


def test_train_flags_are_built_from_the_config_fields():
    """Each --flag sets its config key, with the field's type and (for Literal fields) its choices."""
    import typing

    from adgen.cli import build_parser
    from adgen.commands.train import FLAG_KEYS, build_config
    from adgen.train.config import TrainConfig

    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    by_dest = {a.dest: a for a in train_parser._actions}
    for key in FLAG_KEYS:
        assert key in by_dest, key
        literal = typing.get_type_hints(TrainConfig)[key]
        if typing.get_origin(literal) is typing.Literal:
            assert by_dest[key].choices == list(typing.get_args(literal)), key
    args = parser.parse_args(["train", "--config", "smollm2-135m", "--precision", "fp32", "--max-steps", "3",
                              "--lr", "1e-3", "-o", "runs/x", "lora.r=4"])
    cfg = build_config(args)
    assert (cfg.precision, cfg.max_steps, cfg.lr, cfg.output_dir, cfg.lora.r) == ("fp32", 3, 1e-3, "runs/x", 4)
    with pytest.raises(SystemExit):  # a value outside the Literal is refused by the parser
        parser.parse_args(["train", "--precision", "fp64"])
