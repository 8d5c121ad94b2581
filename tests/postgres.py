"""A private PostgreSQL server for the tests and benchmarks, and one schema per run on it.

    python tests/postgres.py start DIR    # initdb + pg_ctl start in DIR; prints the server's URL
    python tests/postgres.py stop DIR     # pg_ctl stop (immediate) and remove DIR
    python tests/postgres.py check        # exit 0 if PostgreSQL's binaries are installed (prints their folder)

`.ci/run` starts one this way and exports its URL as S3T_TEST_POSTGRES_URL (and stops it on exit, even
when the tests fail); without that variable the test session starts its own (tests/conftest.py), so a
developer's `pytest` exercises PostgreSQL too. The server runs from a temp folder on a free loopback
port with trust authentication for one superuser; PostgreSQL refuses to run as root, so as root the
binaries run as an unprivileged user (`postgres` where the system has one, else a system user made
here). Standard library only: the CI script runs this before the venv has anything else.

Each run gets a schema of its own in the server's `postgres` database (`new_schema`), so runs never see
each other's tables; `clone_schema` copies one run's tables into a fresh schema (a copied run folder must
not share its registry with the original).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

__all__ = ["binaries", "start", "stop", "new_schema", "clone_schema", "drop_schema", "ENV"]

ENV = "S3T_TEST_POSTGRES_URL"   # postgresql+psycopg://USER@127.0.0.1:PORT/postgres
SUPERUSER = "s3t"
SYSTEM_USER = "s3t-postgres"    # created only when running as root on a system without a `postgres` user
BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14)]


def binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres (PATH first, then Debian's layout), or None."""
    found = shutil.which("initdb")
    candidates = ([Path(found).resolve().parent] if found else []) + BIN_DIRS
    for folder in candidates:
        if all((folder / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _as_user() -> list[str]:
    """Prefix that runs a command as an unprivileged user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", SYSTEM_USER):
        try:
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                   check=True, capture_output=True)
    return ["runuser", "-u", SYSTEM_USER, "--"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, *, timeout_s: float = 60.0) -> str:
    """initdb a cluster in `folder` and start it on a free loopback port; returns its SQLAlchemy URL."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL's initdb, pg_ctl and postgres were not found (PATH, /usr/lib/postgresql/*/bin)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = _as_user()
    if prefix:   # the unprivileged user must own the cluster's folder and be able to reach it
        user = pwd.getpwnam(prefix[2])
        os.chown(folder, user.pw_uid, user.pw_gid)
        closed = [p for p in folder.parents if not p.stat().st_mode & 0o001]
        if closed:
            raise RuntimeError(f"{closed[0]} does not let other users pass (mode {closed[0].stat().st_mode & 0o777:o}); "
                               f"PostgreSQL runs as {prefix[2]}: put the cluster under a folder with o+x (chmod 711)")
    data, log = folder / "data", folder / "server.log"
    done = subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                           "-E", "UTF8", "--locale=C", "--no-instructions"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"initdb failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    for attempt in range(5):   # a free port can be taken between the probe and the bind: retry
        port = _free_port()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c max_connections=300 "
                   "-c shared_buffers=64MB")
        done = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                               "-w", "-t", str(int(timeout_s)), "start"], capture_output=True, text=True)
        if done.returncode == 0:
            (folder / "port").write_text(str(port))
            return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/postgres"
        time.sleep(0.2)
    raise RuntimeError(f"PostgreSQL did not start: {done.stderr.strip()}\n{log.read_text(errors='replace')[-2000:]}")


def stop(folder: Path) -> None:
    """Stop the cluster in `folder` (immediately: it is throwaway) and remove the folder."""
    folder = Path(folder)
    bin_dir = binaries()
    if bin_dir is not None and (folder / "data" / "postmaster.pid").exists():
        subprocess.run([*_as_user(), str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate",
                        "-w", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def _engine(url: str):
    from sqlalchemy import create_engine

    return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=_null_pool())


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


def new_schema(url: str, prefix: str = "run") -> str:
    """The name of a fresh, empty schema on the server (created now)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    finally:
        engine.dispose()
    return name


def clone_schema(url: str, source: str) -> str:
    """A new schema holding a copy of every table (structure, indexes and rows) of `source`."""
    name = new_schema(url)
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            tables = conn.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = %(s)s ORDER BY tablename", {"s": source}).scalars()
            for table in list(tables):
                conn.exec_driver_sql(f'CREATE TABLE "{name}"."{table}" (LIKE "{source}"."{table}" INCLUDING ALL)')
                conn.exec_driver_sql(f'INSERT INTO "{name}"."{table}" SELECT * FROM "{source}"."{table}"')
    finally:
        engine.dispose()
    return name


def drop_schema(url: str, name: str) -> None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        folder = binaries()
        print(folder if folder else "PostgreSQL's initdb, pg_ctl and postgres were not found")
        return 0 if folder else 1
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    if argv[0] == "start":
        print(start(Path(argv[1])))
    else:
        stop(Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
