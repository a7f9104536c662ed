"""Check an Optuna storage URL before any work starts, without creating or changing anything.

``search.storage`` is a SQLAlchemy URL (``sqlite:///FILE``, ``postgresql://...``, ``mysql://...``) or the path
of a journal file. ``check_optuna_storage`` is a pure check: it reads file headers and opens (then closes) one
database connection, so a bad value costs the user one error line and leaves no file behind.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from hdkd.config import ConfigError

JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
CONNECT_TIMEOUT_S = 5.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_ACCEPTED = ("set search.storage to sqlite:///FILE, a journal file path ending in "
             f"{', '.join(JOURNAL_SUFFIXES)}, or the URL of a reachable PostgreSQL or MySQL database")


def masked_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, for messages, params and logs."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Not parseable as a URL: hide everything between "user:" and "@".
        scheme, _, rest = url.partition("://")
        user, at, host = rest.rpartition("@")
        return f"{scheme}://{user.split(':', 1)[0]}:***@{host}" if at else url


def check_optuna_storage(url: str) -> None:
    """Raise ConfigError naming the storage (password masked) and the fix unless ``url`` can be opened.

    A SQLite or journal file that does not exist yet passes when its folder exists or can be created. An existing
    SQLite file must be a SQLite database. A database server must accept a connection within
    ``CONNECT_TIMEOUT_S`` seconds.
    """
    if not url or not url.strip():
        raise ConfigError([f"search.storage is empty; {_ACCEPTED}"])
    if "://" not in url:
        if not url.endswith(JOURNAL_SUFFIXES):
            raise ConfigError([f"search.storage={url!r} is invalid: neither a database URL nor a journal file path; "
                               f"{_ACCEPTED}"])
        _check_local_file(url, Path(url).expanduser(), sqlite=False)
        return

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise ConfigError([f"search.storage={masked_url(url)!r} is not a valid database URL ({err}); "
                           f"{_ACCEPTED}"]) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database not in (None, "", ":memory:"):
            _check_local_file(url, Path(database).expanduser(), sqlite=True)
        return
    _check_server(url, parsed)


def _check_local_file(url: str, path: Path, sqlite: bool) -> None:
    def fail(reason: str):
        raise ConfigError([f"Optuna storage {masked_url(url)!r} cannot be opened: {reason}; {_ACCEPTED}"])

    if path.exists():
        if not path.is_file():
            fail(f"{str(path)!r} is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            fail(f"{str(path)!r} is not readable and writable")
        if sqlite and path.stat().st_size:
            with open(path, "rb") as handle:
                if handle.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                    fail(f"{str(path)!r} is not a SQLite database")
        return

    # The file is created on first use: its nearest existing folder must be a writable directory.
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"{str(ancestor)!r} is a file, so {str(path)!r} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail(f"folder {str(ancestor)!r} is not writable")


def _check_server(url: str, parsed) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import NoSuchModuleError

    def fail(reason: str):
        raise ConfigError([f"Optuna storage {masked_url(url)!r} cannot be opened ({reason}); {_ACCEPTED}"])

    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        fail(f"unknown database scheme {parsed.drivername!r}")
    connect_args = {"connect_timeout": int(CONNECT_TIMEOUT_S)} if parsed.get_backend_name() in (
        "postgresql", "mysql", "mariadb") else {}
    try:
        engine = create_engine(parsed, connect_args=connect_args)
    except ImportError as err:
        fail(f"its database driver is not installed: {err}")
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many types for a URL it cannot use
        fail(f"{type(err).__name__}: {_first_line(err)}")

    # The connection runs in a thread that is abandoned after the limit, in case the driver ignores its timeout.
    outcome: list[str | None] = []

    def connect():
        try:
            with engine.connect():
                outcome.append(None)
        except Exception as err:  # noqa: BLE001 - driver errors differ by database
            outcome.append(f"{type(err).__name__}: {_first_line(err)}")
        finally:
            engine.dispose()

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 1)
    problem = outcome[0] if outcome else f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
    if problem is not None:
        fail(problem)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
