"""Atomic file output: write to a temp file in the same directory, fsync, then rename; the same for whole
directories (`temp_dir_for` + `replace_dir`). And reading the small UTF-8 / JSON files a user hands over.

A killed process never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

from adgen.errors import DataError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the usual umask-based mode instead.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def default_file_mode() -> int:
    """The mode open() would give a new file under the current umask (mkstemp gives 0600, which e.g. a
    service running as another user cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that opens its output by name (e.g. gguf's GGUFWriter).

    When the block ends without an exception, the file is fsynced, given the usual umask-based mode and
    renamed to `path`; when it raises, the temporary file is removed. Close the writer inside the block.

        with atomic_output("out/model.gguf") as tmp:
            write_everything_to(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_dir_for(final: str | Path, *, private: bool = False) -> Path:
    """An empty directory beside `final` to write a whole output directory into (then `replace_dir`).

    `private`: a new uniquely named one, for outputs that several processes may build at once (a cache entry);
    otherwise the one `.NAME.tmp`, emptied first (a single writer; a killed one's leftovers go)."""
    final = Path(final)
    if private:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | Path, final: str | Path, *, keep: Callable[[Path], bool] | None = None) -> None:
    """Move a fully written directory into place, replacing an older one: `final` is always either the
    old directory or the new one, never half of each (the old one is moved aside, then deleted).

    `keep`: for an output several processes may build at once (a cache entry, each from its own `private`
    temp dir): a `final` that passes this completeness test is never replaced -- when another process
    published a complete one first, ours is dropped -- and one that fails it (e.g. files deleted by hand) is."""
    tmp, final = Path(tmp), Path(final)
    if keep is not None:
        if final.exists() and not keep(final):
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)  # onto a non-empty directory it fails: someone else's is there
        except OSError:
            if not keep(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def read_utf8_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file (a BOM tolerated), or a DataError naming the file and the fix. `what` says what the file
    should be, for the message ("the predictions file (JSON lines with predict and label)")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; give {what}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8.") from None


def read_json_file(path: str | Path, what: str, *, fix: str = "") -> Any:
    """A UTF-8 JSON file (a BOM tolerated), or a DataError naming the file: `what` it is ("attribute vocabulary
    file"), and `fix`, what to do about one that is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}; check the path.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a UTF-8 JSON {what} ({e}){'; ' + fix if fix else ''}.") from None
