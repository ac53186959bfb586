"""A throwaway PostgreSQL cluster for tests, from Debian's server binaries (apt-get install postgresql).

initdb in a fresh temporary folder, the server listening only on 127.0.0.1 on a free port (unix
socket in the same folder), fsync off; stopped by its process id and removed afterwards. Root cannot
run postgres, so as root the cluster runs as the system user ``postgres`` (Popen's ``user=``, so the
pid we hold is the postmaster's own). The folder is made with mkdtemp under the system temp dir
because pytest's tmp_path lies below a root-only (0700) folder the ``postgres`` user cannot enter.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.servers import free_port

SUPERUSER = "spi"


def find_pg_bin() -> Path | None:
    """The bin folder of the newest PostgreSQL server installed under /usr/lib/postgresql, or PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("postgres") else None


def why_unavailable() -> str | None:
    """None when a throwaway cluster can be started here, else the reason."""
    if find_pg_bin() is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql; looked in /usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' system user to run the server as"
    return None


def server_or_skip() -> Iterator[str]:
    """A pytest fixture's body: yield a throwaway cluster's URL, or skip the test saying why there is none."""
    import pytest

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    with throwaway_postgres() as url:
        yield url


@contextlib.contextmanager
def throwaway_postgres(timeout_s: float = 30.0) -> Iterator[str]:
    """Start a cluster and yield a SQLAlchemy URL of its ``postgres`` database (trust auth)."""
    import psycopg

    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    pg_bin = find_pg_bin()
    run_as: dict = {}
    root = Path(tempfile.mkdtemp(prefix="spi-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(root)}
    data, log = root / "data", root / "server.log"
    proc = None
    try:
        subprocess.run(
            [
                pg_bin / "initdb",
                "-D",
                data,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=root,
            timeout=120,
            **run_as,
        )
        port = free_port()
        with open(log, "wb") as log_fh:
            proc = subprocess.Popen(
                [
                    pg_bin / "postgres",
                    "-D",
                    data,
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-k",
                    root,
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=16MB",
                    "-c",
                    "max_connections=40",
                ],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=root,
                **run_as,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(
                    host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres", connect_timeout=2
                ).close()
                break
            except psycopg.OperationalError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"postgres did not start: {tail}") from exc
                time.sleep(0.1)
        yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/postgres"
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown of the postmaster, by its pid
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGQUIT)
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server; returns its URL."""
    _autocommit(server_url, f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, name: str) -> None:
    _autocommit(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _autocommit(server_url: str, sql: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(server_url)
    with psycopg.connect(
        host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True
    ) as conn:
        conn.execute(sql)
