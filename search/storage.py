"""Where a study lives: SQLite in the run folder by default, any Optuna RDB URL, or a journal file."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, ProgrammingError

from fitness.errors import RopeSearchError

JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
SCHEMA_ATTEMPTS = 5
SQLITE_TIMEOUT_S = 60  # wait this long for another process's lock before giving up ($ROPESEARCH_SQLITE_TIMEOUT)


def storage_url(spec: str | None, run_dir: Path) -> str:
    """The study database: `study.db` in the run folder unless the config names one."""
    return spec or f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


def open_storage(spec: str | None, run_dir: Path) -> optuna.storages.BaseStorage:
    url = storage_url(spec, run_dir)
    if "://" not in url:
        if not url.endswith(JOURNAL_SUFFIXES):
            raise RopeSearchError(f"storage {url!r}: give an RDB URL (sqlite:///..., postgresql://...) or a journal "
                                  f"file ending in {', '.join(JOURNAL_SUFFIXES)}")  # fmt: skip
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
