"""Every file distillfss writes goes through this module, so that no command, API call or app action costs a user
a file.

* **Refused places.** An output that is, contains or lies inside one of the inputs (every path the command reads:
  data, images, the model, ``--teacher``, ``--config``, weights...) is refused, and so is a folder that is or
  contains the working directory, the home directory or a filesystem root.
* **Only the writer replaces.** Every folder written here records what it wrote and which command wrote it
  (``MANIFEST``); ``--overwrite`` removes only the files listed there, and only when the same command wrote them.
  A single-file output (``evaluate --json``, ``speed --json``, ``export --out``) carries the same mark inside it
  (a JSON field ``written_by``, ONNX metadata): an existing file is replaced only with ``--overwrite`` and only when
  that mark names the same command. A non-empty folder without a manifest is refused, and so is a new output file
  that would replace a file the previous run did not write.
* **Atomic.** Folders are written into a temporary folder beside them and moved into place on success (on failure
  the output is as it was); single files are written beside their target and renamed over it; folders that grow
  while a command runs (``benchmark``, ``meta-train``, the app's workspace) record each file before it is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import UserError

MANIFEST = ".distillfss-written.json"
MARK = "written_by"  # the JSON field (and ONNX metadata key) that names the command that wrote a single file

PathLike = str | os.PathLike | None


class OutputError(UserError, ValueError):
    """An output location that would put the user's files at risk; the message names it."""


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def _resolved(inputs: Sequence[PathLike]) -> list[tuple[str, Path]]:
    return [(str(i), Path(i).expanduser().resolve()) for i in inputs if i is not None]


def refuse_unsafe_output(out: PathLike, inputs: Sequence[PathLike] = ()) -> None:
    """Raise OutputError if writing into ``out`` could touch an input or a folder that holds unrelated files."""
    o = Path(out).expanduser().resolve()
    for given, i in _resolved(inputs):
        if _contains(i, o) or _contains(o, i):
            raise OutputError(f"{out}: is, contains or lies inside the input {given}; choose an output outside it")
    if o == Path(o.anchor):
        raise OutputError(f"{out}: is a filesystem root; choose a dedicated output folder")
    for what, place in (("the working directory", Path.cwd()), ("the home directory", Path.home())):
        if _contains(o, place.resolve()):
            raise OutputError(f"{out}: is or contains {what} ({place}); choose a dedicated output folder")


def read_manifest(folder: Path) -> dict | None:
    """A folder's manifest ({"command", "files"}), None without one; an unreadable one is an OutputError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = [str(f) for f in manifest["files"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise OutputError(f"{path}: unreadable manifest; empty {folder} yourself or choose another output") from None
    return {"command": manifest.get("command"), "files": files}


def written_files(folder: Path) -> list[str]:
    """Relative paths a previous run recorded in ``folder``'s manifest ([] without one)."""
    manifest = read_manifest(folder)
    return manifest["files"] if manifest else []


def _overwrite(command: str) -> str:
    """How the caller of ``command`` asks to replace: the CLI's flag, or the Python API's argument."""
    return "--overwrite" if command.startswith("distillfss ") else "overwrite=True"


def _refuse_other_writer(out: Path, manifest: dict, command: str) -> None:
    if manifest["command"] != command:
        writer = f"`{manifest['command']}`" if manifest["command"] else "an older distillfss"
        raise OutputError(
            f"{out}: was written by {writer}; only that writer replaces its files "
            f"(choose another output for `{command}`)"
        )


def check_output(out: PathLike, overwrite: bool, inputs: Sequence[PathLike] = (), *, command: str) -> None:
    """Refuse (before any work is done) an unsafe ``out``, or an existing non-empty one unless ``overwrite`` and
    ``command`` wrote it."""
    _existing_manifest(out, inputs, command, needs_overwrite=not overwrite)


def _existing_manifest(out: PathLike, inputs: Sequence[PathLike], command: str, needs_overwrite: bool) -> dict | None:
    """Refuse an unsafe ``out``, a file, and a non-empty folder that ``command`` did not write (or any non-empty
    folder when ``needs_overwrite``) -> the manifest of a non-empty ``out``, None for a new or empty one."""
    out = Path(out)
    refuse_unsafe_output(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return None
    if needs_overwrite:
        raise OutputError(f"{out}: folder exists and is not empty (pass {_overwrite(command)} to replace it)")
    manifest = read_manifest(out)
    if manifest is None:
        raise OutputError(
            f"{out}: folder exists, is not empty and was not written by distillfss (no {MANIFEST}); choose another "
            "output folder or empty it yourself"
        )
    _refuse_other_writer(out, manifest, command)
    return manifest


def _write_manifest(folder: Path, command: str, files: Sequence[str]) -> None:
    write_json_atomic(folder / MANIFEST, {"command": command, "files": sorted(set(files))})


@contextmanager
def output_folder(out: PathLike, overwrite: bool, inputs: Sequence[PathLike] = (), *, command: str) -> Iterator[Path]:
    """Yield a temporary folder; on success its files replace what a previous run of ``command`` wrote into ``out``.

    On failure (any exception) the temporary folder is removed and ``out`` is unchanged.
    """
    out = Path(out)
    check_output(out, overwrite, inputs, command=command)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        _write_manifest(tmp, command, files)
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


class GrowingFolder:
    """An output folder a long command fills as it goes (``benchmark``, ``meta-train``, the app's workspace) and
    resumes: each file is recorded in the manifest before it is first written, so a later ``--overwrite`` of the
    same command removes exactly those; a file already there that the folder's writer did not record is never
    replaced."""

    def __init__(self, root: Path, command: str) -> None:
        self.root, self.command = Path(root), command
        self._lock = threading.Lock()

    @staticmethod
    def check(out: PathLike, inputs: Sequence[PathLike] = (), *, command: str) -> dict | None:
        """Refuse (before any work, writing nothing) what ``claim`` would refuse -> the manifest of a non-empty
        ``out`` that ``command`` wrote, else None."""
        return _existing_manifest(out, inputs, command, needs_overwrite=False)

    @classmethod
    def claim(
        cls, out: PathLike, overwrite: bool, inputs: Sequence[PathLike] = (), *, command: str
    ) -> tuple[GrowingFolder, bool]:
        """-> (folder, resumed). A new or empty ``out`` is started; one that ``command`` wrote is resumed (its files
        kept), or started again with ``overwrite`` (its recorded files removed, nothing else); anything else is
        refused."""
        out = Path(out)
        manifest = cls.check(out, inputs, command=command)
        resumed = False
        if manifest is not None:
            if overwrite:
                _remove(out, set(manifest["files"]))
            else:
                resumed = True
        out.mkdir(parents=True, exist_ok=True)
        if not resumed:
            _write_manifest(out, command, [])
        return cls(out, command), resumed

    def files(self) -> list[str]:
        return written_files(self.root)

    def merge_journals(self, prefix: str) -> None:
        """Record the files listed in the journals ``prefix*`` (one line per file, appended by processes that write
        into the folder at once, as ``predict`` under torchrun), then delete the journals."""
        journals = sorted(self.root.glob(f"{prefix}*"))
        if not journals:
            return
        names = [n for j in journals for n in j.read_text().splitlines() if n and (self.root / n).is_file()]
        with self._lock:
            _write_manifest(self.root, self.command, [*self.files(), *names])
        for j in journals:
            j.unlink()

    def path(self, rel: str) -> Path:
        """The path of ``rel`` inside the folder, recorded as written by this command (refused if a file of that
        name is there and was not)."""
        target = self.root / rel
        if self.root.resolve() not in target.resolve().parents:
            raise OutputError(f"{target}: lies outside {self.root}")
        with self._lock:
            files = self.files()
            if rel not in files:
                if target.exists() or target.is_symlink():
                    raise OutputError(f"{target}: was not written by distillfss and would be replaced")
                _write_manifest(self.root, self.command, [*files, rel])
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def remove(self, rel: str) -> None:
        """Delete a file this folder's writer recorded (a file not recorded is left alone)."""
        with self._lock:
            files = self.files()
            if rel in files:
                (self.root / rel).unlink(missing_ok=True)
                _write_manifest(self.root, self.command, [f for f in files if f != rel])

    def write_json(self, rel: str, obj: object) -> Path:
        path = self.path(rel)
        write_json_atomic(path, obj)
        return path

    def write_text(self, rel: str, text: str) -> Path:
        path = self.path(rel)
        write_text_atomic(path, text)
        return path

    def write_with(self, rel: str, write: Callable[[Path], None]) -> Path:
        """``write(tmp)`` writes the file's content to a temporary path, renamed over ``rel`` when it returns."""
        path = self.path(rel)
        replace_atomically(path, write)
        return path

    def unique(self, rel: str) -> str:
        """``rel``, or ``rel`` with -2, -3... before its suffix: the first name no file or record holds."""
        p, n, files = Path(rel), 2, set(self.files())
        candidate = rel
        while candidate in files or (self.root / candidate).exists():
            candidate, n = (p.parent / f"{p.stem}-{n}{p.suffix}").as_posix(), n + 1
        return candidate


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


def mark_of(path: Path) -> str | None:
    """The command a single-file output records as its writer (JSON field / ONNX metadata ``written_by``)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            obj = json.loads(path.read_text())
            return obj.get(MARK) if isinstance(obj, dict) else None
        if path.suffix.lower() == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            return next((p.value for p in model.metadata_props if p.key == MARK), None)
    except Exception:  # noqa: BLE001 - any unreadable file is "not ours"
        return None
    return None


def check_output_file(path: PathLike, overwrite: bool, inputs: Sequence[PathLike] = (), *, command: str) -> None:
    """Refuse (before any work is done) a single-file output that is or lies inside an input, is a folder, or
    exists unless ``overwrite`` and ``command`` wrote it (its mark)."""
    p = Path(path)
    resolved = p.expanduser().resolve()
    for given, i in _resolved(inputs):
        if _contains(i, resolved) or _contains(resolved, i):
            raise OutputError(f"{path}: is or lies inside the input {given}; choose a file outside it")
    if p.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise OutputError(f"{path}: exists (pass {_overwrite(command)} to replace it)")
        if p.is_symlink() or mark_of(p) != command:
            raise OutputError(
                f"{path}: exists and was not written by `{command}`; {_overwrite(command)} replaces only that "
                "command's own output (choose another file name)"
            )


@contextmanager
def output_file(path: PathLike, overwrite: bool, inputs: Sequence[PathLike] = (), *, command: str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (checked as
    ``check_output_file``). The caller writes the mark (``MARK``) into the file."""
    path = Path(path)
    check_output_file(path, overwrite, inputs, command=command)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def write_json_file(
    path: PathLike, obj: dict, overwrite: bool, inputs: Sequence[PathLike] = (), *, command: str
) -> Path:
    """A single JSON result file, marked with its writer and replaced atomically (see ``output_file``)."""
    with output_file(path, overwrite, inputs, command=command) as tmp:
        tmp.write_text(json.dumps({**obj, MARK: command}, indent=2) + "\n")
    return Path(path)


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


def provenance(command: str, device: torch.device | str = "cpu", commit: str = "HEAD") -> dict[str, str]:
    """What a result file records about how it was made: the command, the commit of this package's checkout it ran
    at (short hash; empty without git, when the package is not in a git checkout, or for an unknown commit), the
    machine and the date."""
    import subprocess

    here = Path(__file__).parent  # the package's checkout, whatever the working directory
    try:
        found = subprocess.run(["git", "rev-parse", "--short", commit], cwd=here, capture_output=True, text=True)
        sha = found.stdout.strip()
    except OSError:  # no git on this machine
        sha = ""
    return {"command": command, "commit": sha, "machine": machine(device), "date": timestamp()}


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second (when results and models were made)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: object) -> None:
    """Replace ``path`` with ``obj`` as indented JSON in one rename (a kill leaves the old file or the new one)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a kill leaves the old file or the new one)."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed over it."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(name))
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
