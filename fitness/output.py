"""How every command that writes (train, eval, export, pretrain) writes, so none of them can lose a
user's files or leave half a result.

- Before anything runs, the destination is checked: no file where a folder must go, names the file
  system accepts, and a folder it can write in (a read-only one is a fault of the environment).
- A result that is made once (an evaluation, an export) is built under a unique hidden name beside
  its destination and moved there whole at the end, never over anything: a failure or a kill leaves
  nothing, and a destination that appeared meanwhile is never replaced.
- A folder that is worked in and resumed (training, pretraining) is claimed: it is new, empty, or
  holds this command's own owner file with the same content; anything else is refused. It is locked
  while in use, so a second command on it is refused at once.
- Single files are replaced atomically through a unique temp name, removed on failure.
- A write the system refuses (full disk, quota, read-only, no permission) becomes one line that says
  what failed and how to go on (EnvironmentFault: exit code 1).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fitness.errors import EnvironmentFault, RopeSearchError

LOCK_FILE = ".ropesearch.lock"
WRITE_FAULTS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# what torch and safetensors say when the system refuses a write (they raise without an errno)
WRITE_FAULT_TEXTS = ("no space left", "file too large", "disk quota", "read-only file system", "file write failed",
                     "storagefull", "permission denied")
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile, cut short by the system


def _mode(bits: int) -> int:
    """`bits` under the process's umask: what a file made by open() would get (mkstemp/mkdtemp make 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return bits & ~mask


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except OSError:  # missing, or a name too long to look up (ENAMETOOLONG): not there either way
        return False


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def check_destination(path: Path, label: str) -> None:
    """`path` can be made: no file on the way to it, each new name short enough, and the nearest existing
    folder writable. Raised before anything is computed or written."""
    path = Path(path)
    existing = _nearest_existing(path)
    if existing != Path(os.path.abspath(path)) and not existing.is_dir():
        raise RopeSearchError(f"{label} {path}: {existing} is a file, not a folder; choose another {label}")
    name_max = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    for name in Path(os.path.abspath(path)).relative_to(existing).parts:
        if len(name.encode()) > name_max - 16:  # room for the hidden temp name it is built under
            raise RopeSearchError(f"{label} {path}: the name {name[:40]}... is longer than this file system allows")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(folder) else "no permission to write there"
        raise EnvironmentFault(f"{label} {path}: cannot write in {folder} ({why}); choose another {label}")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def refuse_existing(path: Path, label: str) -> None:
    """A result made once never replaces anything: an existing file or non-empty folder is refused."""
    path = Path(path)
    if path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir())):
        raise RopeSearchError(f"{label} {path}: exists; choose another or remove it")
    if path.exists() and not path.is_dir():
        raise RopeSearchError(f"{label} {path}: exists and is not a folder; choose another")


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones made, deepest first, to undo them."""
    made = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        made.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _undo(made: list[Path]) -> None:
    for folder in made:
        try:
            folder.rmdir()  # only if still empty: never what someone else put there meanwhile
        except OSError:
            break


def _publish(tmp: Path, final: Path, label: str) -> None:
    """Move a finished file or folder into place without replacing anything that is there."""
    try:
        if tmp.is_dir():
            os.rename(tmp, final)  # fails on a non-empty folder; an empty one is taken
        else:
            os.link(tmp, final)  # fails if `final` exists, unlike rename
            tmp.unlink()
    except FileExistsError:
        raise RopeSearchError(f"{label} {final}: appeared while this ran; the result was not written") from None
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise RopeSearchError(f"{label} {final}: appeared while this ran; the result was not written") from None
        raise


@contextmanager
def new_output(final: Path, label: str, folder: bool = True) -> Iterator[Path]:
    """A scratch folder (or file) with a unique hidden name beside `final`; moved to `final` whole when the
    block ends, removed (with any parent folders made for it) when it fails."""
    final = Path(final)
    made = _make_parents(final.parent)
    try:
        prefix, suffix = f".{final.name}.", ".tmp"
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=final.parent))
            os.chmod(tmp, _mode(0o777))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=final.parent)
            os.close(handle)
            tmp = Path(name)
            os.chmod(tmp, _mode(0o666))
    except BaseException:
        _undo(made)
        raise
    try:
        yield tmp
        _publish(tmp, final, label)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        _undo(made)
        raise


@contextmanager
def rebuilt_folder(final: Path) -> Iterator[Path]:
    """A command's own folder (inside the folder it has claimed) rebuilt under a unique name and swapped
    in at the end: the old one stays whole until the new one is."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, _mode(0o777))
        yield tmp
        old = final.with_name(f"{tmp.name}.old")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def files_into(folder: Path) -> Iterator[Path]:
    """A unique scratch folder beside `folder`; when the block ends, each file made in it replaces its
    namesake in `folder` atomically (other files of `folder` are kept). Removed either way."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        for path in sorted(tmp.iterdir()):
            os.chmod(path, _mode(0o666))
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A unique temp path beside `path`; it replaces `path` when the block ends, and is removed on failure."""
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        os.chmod(tmp, _mode(0o666))
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, content: str | bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    return Path(path)


@contextmanager
def held(lock_file: Path, busy: str) -> Iterator[None]:
    """An exclusive lock on `lock_file` while the block runs; `busy` (one line: who holds it, how to go on)
    when another process has it. Closing releases it, so a killed process's lock goes with it."""
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EnvironmentFault(busy) from None
        yield
    finally:
        os.close(descriptor)


@contextmanager
def claimed_folder(
    folder: Path, label: str, what: str, owner: str, content: str, same: Callable[[str], bool]
) -> Iterator[Path]:
    """A work folder for `what` (a training run...), locked while the block runs. A new or empty folder is
    made this command's own by writing `content` to its `owner` file; an existing one is taken only if
    `same(text of its owner file)`. Anything else (a user's folder, another config's run) is refused."""
    folder = Path(folder)
    check_owner(folder, label, owner, same)
    if not folder.exists():
        made = _make_parents(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            os.chmod(tmp, _mode(0o777))
            write_atomic(tmp / owner, content)
            try:
                _publish(tmp, folder, label)
            except RopeSearchError:  # another command made it first: it is judged as any existing folder
                shutil.rmtree(tmp, ignore_errors=True)
                check_owner(folder, label, owner, same)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _undo(made)
            raise
    with held(folder / LOCK_FILE, f"{folder} is in use by another {what}; wait for it to finish or stop it, "
                                  "then run the same command again"):
        if not (folder / owner).exists():  # an empty folder, taken
            write_atomic(folder / owner, content)
        check_owner(folder, label, owner, same)
        yield folder


def check_owner(folder: Path, label: str, owner: str, same: Callable[[str], bool]) -> None:
    """`folder` may be worked in: it does not exist, is empty (but for a lock), or its owner file matches."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RopeSearchError(f"{label} {folder}: is a file, not a folder; choose another {label}")
    path = folder / owner
    if not path.is_file():
        if any(p.name != LOCK_FILE for p in folder.iterdir()):
            raise RopeSearchError(f"{label} {folder}: holds files this command did not make; choose another {label}")
        return
    try:
        ours = same(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise RopeSearchError(f"{label} {folder}: holds a run of another config ({owner} differs); choose another "
                              f"{label}")


def write_fault(err: BaseException) -> bool:
    """Whether `err` is the system refusing a write (full disk, quota, read-only, no permission)."""
    if isinstance(err, OSError) and err.errno in WRITE_FAULTS:
        return True
    text = str(err).lower()
    return isinstance(err, (OSError, RuntimeError)) and (any(t in text for t in WRITE_FAULT_TEXTS)
                                                         or SHORT_WRITE.search(text) is not None)


@contextmanager
def faults(where: Path, then: str) -> Iterator[None]:
    """A write the system refuses while the block runs becomes an EnvironmentFault naming `where` (or the
    file it failed on) and saying `then`, how to go on."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not write_fault(err):
            raise
        failed = getattr(err, "filename", None) or where
        reason = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
        raise EnvironmentFault(f"cannot write {failed} ({reason}); {then}") from None
