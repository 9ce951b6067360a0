"""The recipes shipped with adgen: YAML training configs (and accelerate / DeepSpeed launch configs).

They are package data, so an installed wheel has them too: `adgen recipes list`, `adgen recipes copy NAME`,
and `adgen train --config NAME` (a recipe's name instead of a path). In a clone, `configs/` points here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from adgen.errors import ConfigError

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Recipe:
    name: str  # path under the recipes folder without the suffix: "smollm2-135m-adgen", "accelerate/fsdp-cpu"
    path: Path
    summary: str  # the file's first comment line

    @property
    def kind(self) -> str:
        return self.name.split("/")[0] if "/" in self.name else "train"


def recipes_dir() -> Path:
    return Path(str(resources.files("adgen") / "recipes"))


def _summary(path: Path) -> str:
    """The opening comment's first sentence (its usage lines, indented, left out)."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        words.append(line.lstrip("# ").strip())
    text = " ".join(words)
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 120 else text[:117].rstrip() + "..."


def list_recipes() -> list[Recipe]:
    root = recipes_dir()
    found = [p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    out = [Recipe(str(p.relative_to(root).with_suffix("")), p, _summary(p)) for p in found]
    return sorted(out, key=lambda r: (r.kind != "train", r.name))


def find_recipe(name: str) -> Path:
    """The file of a shipped recipe, by name (with or without its suffix)."""
    recipes = list_recipes()
    for r in recipes:
        if name in (r.name, r.name + r.path.suffix, r.path.name):
            return r.path
    names = ", ".join(r.name for r in recipes if r.kind == "train")
    raise ConfigError(f"no recipe or file named {name!r}; the shipped training recipes are: {names} "
                      "(`adgen recipes list`), or pass the path of your own YAML file")


def resolve_config_path(path: str | Path) -> Path:
    """`--config` value: an existing file as is, else a shipped recipe's name."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent == Path(".") or str(path).startswith(("configs/", "accelerate/", "deepspeed/")):
        return find_recipe(str(path).removeprefix("configs/"))
    raise ConfigError(f"{path}: no such config file. Check the path, or name a shipped recipe (`adgen recipes list`)")


def copy_recipe(name: str, dest: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Copy a recipe to `dest` (a file or a directory; default: ./<file name>) to edit it."""
    src = find_recipe(name)
    target = Path(dest) if dest is not None else Path(src.name)
    if target.is_dir():
        target = target / src.name
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it or give another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target
