"""Output folders that never cost a user a file.

* An ``--out`` that is, contains or lies inside one of the command's inputs is refused, and so is one that is or
  contains the working directory, the home directory or a filesystem root.
* Everything is written into a temporary folder beside ``--out`` and moved into place only when the command
  succeeded; on failure ``--out`` is as it was.
* Every folder written here records what it wrote (``MANIFEST``). ``--overwrite`` removes only the files a previous
  run listed there and never touches anything else; a non-empty folder without a manifest is refused, and so is a
  new output file that would replace a file the previous run did not write.
* JSON results are replaced atomically (temporary file + rename): a kill leaves the old file or the new one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import UserError

MANIFEST = ".distillfss-written.json"


class OutputError(UserError, ValueError):
    """An output location that would put the user's files at risk; the message names it."""


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def refuse_unsafe_output(out: Path, inputs: Sequence[Path | None] = ()) -> None:
    """Raise OutputError if writing into ``out`` could touch an input or a folder that holds unrelated files."""
    o = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None:
            continue
        i = Path(given).expanduser().resolve()
        if _contains(i, o) or _contains(o, i):
            raise OutputError(
                f"{out}: is, contains or lies inside the input {given}; choose an output folder outside it"
            )
    if o == Path(o.anchor):
        raise OutputError(f"{out}: is a filesystem root; choose a dedicated output folder")
    for what, place in (("the working directory", Path.cwd()), ("the home directory", Path.home())):
        if _contains(o, place.resolve()):
            raise OutputError(f"{out}: is or contains {what} ({place}); choose a dedicated output folder")


def written_files(folder: Path) -> list[str]:
    """Relative paths a previous run recorded in ``folder``'s manifest ([] without one)."""
    path = folder / MANIFEST
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OutputError(f"{path}: unreadable manifest; empty {folder} yourself or choose another output") from None
    return [str(f) for f in files]


def check_output(out: Path, overwrite: bool, inputs: Sequence[Path | None] = ()) -> None:
    """Refuse (before any work is done) an unsafe ``out``, or an existing non-empty one unless ``overwrite`` and it
    was written by distillfss."""
    out = Path(out)
    refuse_unsafe_output(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
        if not (out / MANIFEST).is_file():
            raise OutputError(
                f"{out}: --overwrite only replaces what distillfss wrote, and this folder has no {MANIFEST}; "
                "choose another output folder or empty it yourself"
            )


@contextmanager
def output_folder(out: Path, overwrite: bool, inputs: Sequence[Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success its files replace what a previous run wrote into ``out``.

    On failure (any exception) the temporary folder is removed and ``out`` is unchanged.
    """
    out = Path(out)
    check_output(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        if not out.exists() or not any(out.iterdir()):
            if out.exists():
                out.rmdir()
            tmp.rename(out)
            return
        old = set(written_files(out))
        clash = [f for f in files if f not in old and (out / f).exists()]
        if clash:
            raise OutputError(f"{out / clash[0]}: was not written by distillfss and would be replaced; nothing written")
        _remove(out, old)
        for rel in [*files, MANIFEST]:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(folder: Path, files: set[str]) -> None:
    """Delete the listed files of ``folder`` (never following a path outside it), then folders they leave empty."""
    root = folder.resolve()
    parents: set[Path] = set()
    for rel in files:
        path = folder / rel
        if root not in path.parent.resolve().parents and path.parent.resolve() != root:
            continue  # a manifest entry pointing outside the folder is ignored, never followed
        if path.is_symlink() or path.is_file():
            path.unlink()
            parents.update(p for p in path.parents if _contains(folder, p) and p != folder)
    for p in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    (folder / MANIFEST).unlink(missing_ok=True)


def machine(device: torch.device | str = "cpu") -> str:
    """The processor (the GPU's name on CUDA) and torch version a result was computed with. Training rounds
    differently on another CPU model (other vector kernels), and a few hundred steps carry that to about a point of
    mIoU per run: the same command gives the same numbers on one machine, not across machines (README, design
    notes, "Same input, same answer")."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, torch {torch.__version__}"


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second (when results and models were made)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: object) -> None:
    """Replace ``path`` with ``obj`` as indented JSON in one rename (a kill leaves the old file or the new one)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a kill leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
