"""A directory that one job owns: its files, what shows a run of it is there, and the settings it was run with.

Three jobs write such a directory -- training (adgen.train.run_dir), evaluation (adgen.evaluation.run) and Ray
catalog generation (adgen.generation.ray_catalog). Each describes its own as a `RunDirectory` (the files it
writes, its markers, its manifest, its messages) and `prepare` decides the same way for all of them:

- a file where the directory should be: refused;
- a non-empty directory with none of the job's markers: refused (a wrong --output must not get mixed into, or
  deleted from), unless the job shares its directory with other files (`messages.foreign` None);
- `overwrite`: only the job's own files are deleted (never a file of someone else's); files of others left
  beside them are refused where the job says so (`messages.leftovers`);
- an unfinished run (`resumable` files) of the same settings (the manifest) is resumed; of other settings,
  refused, naming the settings that differ;
- a finished run (markers, nothing to resume) needs overwrite; `resume=True` (the trainer, which checks
  its own checkpoints) only needs the directory to be there.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adgen.config import dict_diff
from adgen.errors import AdgenError
from adgen.io import atomic_write_json


@dataclass(frozen=True)
class RunDirMessages:
    """What each refusal says (the job's own words, with its option names). Placeholders: `{path}` the
    directory, `{diff}` the settings that differ, `{found}` the job's files found, `{leftovers}` the files of
    others left after overwrite."""

    is_file: str
    other_settings: str = "{path} holds a run of other settings ({diff})"
    unreadable: str = "{path}: the run's settings file is missing or unreadable"
    finished: str = "{path} already holds a run ({found})"
    missing: str = "{path} does not exist; nothing to resume"
    foreign: str | None = None  # None: the job shares its directory with files of others
    leftovers: str | None = None  # None: files of others may stay beside an overwritten run


@dataclass(frozen=True)
class RunDirectory:
    """One job's directory layout (see the module docstring)."""

    owned: tuple[str, ...]  # glob patterns (relative) of all the job writes: overwrite deletes these, nothing else
    markers: tuple[str, ...]  # names whose presence shows a (finished) run of the job is there
    messages: RunDirMessages
    manifest: str | None = None  # the file holding the run's settings (None: the job keeps none here)
    settings_key: str | None = None  # the settings sit under this key of the manifest (None: the whole file)
    resumable: tuple[str, ...] = ()  # names that show an unfinished run, resumed when its settings match

    def prepare(self, path: str | Path, settings: dict[str, Any] | None = None, *, overwrite: bool = False,
                resume: bool = False) -> bool:
        """Check `path` can take a run of `settings`; True when an unfinished run of the same settings is there to
        resume (or `resume` was asked for). With `overwrite`, the job's files are deleted first."""
        path = Path(path)
        say = self.messages
        if path.exists() and not path.is_dir():
            raise AdgenError(say.is_file.format(path=path))
        if resume:
            if not path.is_dir():
                raise AdgenError(say.missing.format(path=path))
            return True
        found = [m for m in self.markers if (path / m).exists()]
        if say.foreign is not None and not found and path.is_dir() and any(path.iterdir()):
            raise AdgenError(say.foreign.format(path=path))
        if overwrite:
            self.clear(path)
            leftovers = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
            if say.leftovers is not None and leftovers:
                raise AdgenError(say.leftovers.format(path=path, leftovers=", ".join(leftovers[:5])))
            return False
        if any((path / name).exists() for name in self.resumable):
            stored = self.stored_settings(path)
            wanted = _as_json(settings or {})
            if stored != wanted:
                raise AdgenError(say.other_settings.format(path=path, diff="; ".join(dict_diff(stored, wanted))))
            return True
        if found:
            raise AdgenError(say.finished.format(path=path, found=", ".join(found)))
        return False

    def stored_settings(self, path: Path) -> dict[str, Any]:
        """The settings in the manifest of the run at `path` (an AdgenError when it cannot be read)."""
        try:
            data = json.loads((path / str(self.manifest)).read_text(encoding="utf-8"))
            return data[self.settings_key] if self.settings_key is not None else data
        except (OSError, ValueError, KeyError, TypeError):
            raise AdgenError(self.messages.unreadable.format(path=path)) from None

    def claim(self, path: str | Path, settings: dict[str, Any], **extra: Any) -> None:
        """Mark `path` as this job's run of `settings` (the manifest, with `extra` beside the settings), unless it
        is already."""
        path = Path(path)
        manifest = path / str(self.manifest)
        if manifest.exists():
            return
        content = {self.settings_key: settings, **extra} if self.settings_key is not None else _as_json(settings)
        atomic_write_json(manifest, content)

    def clear(self, path: Path) -> None:
        """Delete the job's own files and folders at `path` (nothing else)."""
        if not path.is_dir():
            return
        for pattern in self.owned:
            for item in sorted(path.glob(pattern)):
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink(missing_ok=True)


def _as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as they read back from the manifest (tuples as lists, paths and other objects as strings)."""
    return json.loads(json.dumps(settings, default=str))
