"""Where a study lives: SQLite in the run folder by default, any Optuna RDB URL, or a journal file."""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, ProgrammingError

from fitness.errors import EnvironmentFault, RopeSearchError  # noqa: F401  (EnvironmentFault: imported from here too)

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
SCHEMA_ATTEMPTS = 5
SQLITE_TIMEOUT_S = 60  # wait this long for another process's lock before giving up ($ROPESEARCH_SQLITE_TIMEOUT)
STUDY_DB = "study.db"


def storage_url(spec: str | None, run_dir: Path) -> str:
    """The study database: `study.db` in the run folder unless the config names one."""
    return spec or f"sqlite:///{(Path(run_dir) / STUDY_DB).resolve()}"


def _sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL (None for an in-memory one or another database)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
    return Path(path.removeprefix("file:")) if path and path != ":memory:" else None


def check_reachable(spec: str | None, source: str) -> None:
    """Before a run folder exists: a journal or SQLite file must be creatable where it is named, and
    any other database must answer. Bad paths are bad input; a server that does not answer is not."""
    if spec is None:
        return
    where = f"{source}: storage {spec!r}"
    if "://" not in spec:
        path = Path(spec).expanduser()
    else:
        path = _sqlite_path(spec)
    if path is not None:
        if not path.parent.is_dir():
            raise RopeSearchError(f"{where}: no such folder {path.parent}")
        if path.is_dir():
            raise RopeSearchError(f"{where}: {path} is a folder, not a database file")
        if "://" not in spec and not spec.endswith(JOURNAL_SUFFIXES):
            open_storage(spec, Path("."))  # says which forms are accepted
        return
    try:
        open_storage(spec, Path("."))
    except RopeSearchError:
        raise
    except Exception as err:  # the server is down or refuses us: nothing was created, the same command retries
        first = " ".join((str(err).strip().splitlines() or [type(err).__name__])[0].split())[:300]
        raise EnvironmentFault(f"{where} cannot be reached ({type(err).__name__}: {first}); no run folder was "
                               "created: start the database, then run the same command again") from None


def check_study_file(run_dir: Path) -> None:
    """A run's own study.db must be there and whole before it is resumed or read: opening a missing or
    empty one would silently make a new, empty study."""
    db = Path(run_dir) / STUDY_DB
    recover = (f"its evaluations are lost; {run_dir / 'best_factors.json'} keeps the best found so far, and "
               f"`ropesearch search {run_dir / 'config.yaml'}` starts over in a new run folder")
    if not db.is_file():
        raise EnvironmentFault(f"{db} is missing: {recover}")
    if db.stat().st_size == 0:
        raise EnvironmentFault(f"{db} is empty: {recover}")
    try:
        with sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S) as connection:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
            connection.execute("SELECT COUNT(*) FROM studies").fetchone()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            raise
        raise EnvironmentFault(f"{db} is not a study database ({err}): {recover}") from None
    except sqlite3.DatabaseError as err:
        raise EnvironmentFault(f"{db} is damaged ({err}): {recover}") from None
    if verdict != "ok":
        raise EnvironmentFault(f"{db} is damaged ({' '.join(verdict.split())[:200]}): {recover}")


def open_storage(spec: str | None, run_dir: Path, read_only: bool = False) -> optuna.storages.BaseStorage:
    """The study's storage; `read_only` (status) opens the run's own SQLite file without writing to it,
    so status also works on a folder it may not write to."""
    url = storage_url(spec, run_dir)
    if read_only and spec is None:
        db = Path(run_dir).resolve() / STUDY_DB
        return RDBStorage(f"sqlite:///file:{db}?mode=ro&uri=true", skip_table_creation=True)
    if "://" not in url:
        if not url.endswith(JOURNAL_SUFFIXES):
            raise RopeSearchError(f"storage {url!r}: give an RDB URL (sqlite:///..., postgresql://...) or a journal "
                                  f"file ending in {', '.join(JOURNAL_SUFFIXES)}")
        return JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
    timeout = float(os.environ.get("ROPESEARCH_SQLITE_TIMEOUT", SQLITE_TIMEOUT_S))
    kwargs = {"connect_args": {"timeout": timeout}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return RDBStorage(url, engine_kwargs=kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as err:  # a malformed URL or a missing DB driver
            raise RopeSearchError(f"storage {url}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
        except (IntegrityError, ProgrammingError):
            # two drivers started together on an empty database both create Optuna's tables; the loser's
            # CREATE fails ("already exists"), and its next try finds the schema there
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.2 + random.random())
