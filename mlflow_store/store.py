"""The SQLAlchemy store: prompts, rollouts, rewards, value-fit datasets, generations, judgements.

Every table's primary key is its natural key, so every bulk insert is idempotent (insert-or-ignore,
or upsert on request) on SQLite and PostgreSQL alike, and a rerun finds what is already done.
SQLite by default (``sqlite:///<workdir>/store.db``), PostgreSQL by URL
(``postgresql+psycopg://user@host:5432/db``). The schema is versioned: ``Store`` brings an older
database up to ``SCHEMA_VERSION`` through the ``MIGRATIONS`` list, keeping its rows. The tables and
migrations live in mlflow_store.schema, the SQL summaries (compare_runs, rollout_summary) in
mlflow_store.summaries; their public names are importable from here too.

Pass the URL between tasks, not a Store object.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, event, func, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from mlflow_store import summaries
from mlflow_store.schema import (  # noqa: F401  (the store's public names, re-exported)
    MIGRATIONS,
    SCHEMA_VERSION,
    TABLES,
    Base,
    Generation,
    Judgement,
    Migration,
    Prompt,
    Reward,
    Rollout,
    SchemaVersion,
    ValueDataset,
    rollout_key,
    text_digest,
)

_CHUNK = 500


class StoreError(RuntimeError):
    """The store URL is malformed, unreachable, or its schema cannot be used by this code."""


# --------------------------------------------------------------------------- paths


def default_store_url(workdir: str | os.PathLike) -> str:
    """``sqlite:///<workdir>/store.db`` (absolute; creates the work directory)."""
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'store.db'}"


# --------------------------------------------------------------------------- the store


class Store:
    """A handle on one store database. ``Store(url)`` connects and upgrades the schema."""

    def __init__(self, url: str, upgrade: bool = True, echo: bool = False):
        self.url = _normalise_url(url)
        self.engine = _make_engine(self.url, echo)
        if upgrade:
            self.upgrade()

    def __repr__(self) -> str:
        return f"Store({self.safe_url!r})"

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def schema_version(self) -> int | None:
        """The database's schema version; None for an empty database."""
        try:
            with self.engine.connect() as conn:
                if not inspect(conn).has_table(SchemaVersion.__tablename__):
                    return None
                return conn.execute(select(func.max(SchemaVersion.version))).scalar()
        except OperationalError as exc:
            raise StoreError(f"cannot open store {self.safe_url!r}: {exc.orig}") from exc

    def upgrade(self) -> int:
        """Create a fresh schema, or migrate an older one to SCHEMA_VERSION; returns the version."""
        with _upgrade_lock:
            current = self.schema_version()
            with self.engine.begin() as conn:
                if current is None:
                    ours = set(TABLES) & set(inspect(conn).get_table_names())
                    if ours:
                        raise StoreError(
                            f"store {self.safe_url!r} has tables {sorted(ours)} but no schema_version "
                            "table: not a database this code created; refusing to touch it"
                        )
                    Base.metadata.create_all(conn)
                    _record_version(conn, SCHEMA_VERSION, "created")
                    return SCHEMA_VERSION
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"store {self.safe_url!r} has schema version {current}, newer than this "
                        f"code's {SCHEMA_VERSION}: upgrade the code"
                    )
                for migration in MIGRATIONS:
                    if migration.version > current:
                        for statement in migration.statements:
                            conn.exec_driver_sql(statement)
                        _record_version(conn, migration.version, migration.note)
                Base.metadata.create_all(conn)  # tables added in later versions (checkfirst)
            return SCHEMA_VERSION

    # ------------------------------------------------------------------ bulk inserts

    def insert(self, table: str, rows: Iterable[Mapping], on_conflict: str = "ignore") -> int:
        """Insert a list of dicts into ``table``; rows whose key exists are skipped ("ignore") or
        overwritten ("update"). Returns the number of rows inserted or updated."""
        model = _model(table)
        rows = _complete_rows(model, [dict(r) for r in rows])
        if not rows:
            return 0
        if on_conflict not in ("ignore", "update"):
            raise ValueError(f"on_conflict must be 'ignore' or 'update', not {on_conflict!r}")
        dialect = self.engine.dialect.name
        builder = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
        if builder is None:
            raise StoreError(f"store dialect {dialect!r} is not supported (sqlite, postgresql)")
        keys = [c.name for c in model.__table__.primary_key.columns]
        changed = 0
        with self.engine.begin() as conn:
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start : start + _CHUNK]
                stmt = builder(model.__table__).values(chunk)  # one multi-VALUES statement per chunk
                if on_conflict == "ignore":
                    stmt = stmt.on_conflict_do_nothing(index_elements=keys)
                else:
                    update = {c: stmt.excluded[c] for c in chunk[0] if c not in keys}
                    stmt = (
                        stmt.on_conflict_do_update(index_elements=keys, set_=update)
                        if update
                        else stmt.on_conflict_do_nothing(index_elements=keys)
                    )
                stmt = stmt.execution_options(preserve_rowcount=True)  # not kept for INSERT by default
                changed += max(conn.execute(stmt).rowcount, 0)
        return changed

    def add_prompts(self, rows: Iterable[Mapping]) -> int:
        """Rows: prompt_key, text, [split]."""
        return self.insert("prompts", ({"split": "train", **r} for r in rows))

    def add_rollouts(self, rows: Iterable[Mapping]) -> int:
        """Rows: run_key, system, iteration, prompt_key, row_index, text, n_tokens (rollout_key is derived)."""
        out = []
        for r in rows:
            r = dict(r)
            _require(r, ("run_key", "system", "iteration", "prompt_key", "row_index"), "rollouts")
            r.setdefault(
                "rollout_key",
                rollout_key(r["run_key"], r["system"], r["iteration"], r["prompt_key"], r["row_index"]),
            )
            out.append(r)
        return self.insert("rollouts", out)

    def add_rewards(self, rows: Iterable[Mapping], on_conflict: str = "ignore") -> int:
        """Rows: reward_model, rollout_key, reward."""
        return self.insert("rewards", rows, on_conflict)

    def add_value_datasets(self, rows: Iterable[Mapping]) -> int:
        """Rows: digest, path, [run_key, iteration, n_examples]."""
        return self.insert("value_datasets", rows)

    def add_generations(self, rows: Iterable[Mapping], on_conflict: str = "ignore") -> int:
        """Rows: run_key, system, iteration, instruction_key, output, and instruction_digest or
        instruction (text); optional policy_tokens, value_tokens, reward_tokens, w2s_tokens, seconds,
        reward, reward_model. output_digest is derived from output."""
        out = []
        for r in rows:
            r = dict(r)
            instruction = r.pop("instruction", None)
            if "instruction_digest" not in r:
                if instruction is None:
                    raise ValueError("generations rows need 'instruction_digest' or 'instruction'")
                r["instruction_digest"] = text_digest(instruction)
            _require(r, ("output",), "generations")
            r.setdefault("output_digest", text_digest(r["output"]))
            out.append(r)
        return self.insert("generations", out, on_conflict)

    def add_judgements(self, rows: Iterable[Mapping], on_conflict: str = "ignore") -> int:
        """Rows: judge, instruction_digest, output_1_digest, output_2_digest, preference (in [1, 2])."""
        rows = list(rows)
        for r in rows:
            if not 1.0 <= float(r.get("preference", 0)) <= 2.0:
                raise ValueError(f"judgement preference must lie in [1, 2]: {r}")
        return self.insert("judgements", rows, on_conflict)

    # ------------------------------------------------------------------ reads

    def rows(self, table: str, **equals) -> list[dict]:
        """All rows of ``table`` whose columns equal ``equals`` (e.g. rows("rewards", reward_model=m))."""
        model = _model(table)
        _check_columns(model, [equals])
        stmt = select(model.__table__).where(*(model.__table__.c[k] == v for k, v in equals.items()))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def count(self, table: str, **equals) -> int:
        """Number of rows of ``table`` matching ``equals``."""
        model = _model(table)
        _check_columns(model, [equals])
        stmt = select(func.count()).select_from(model.__table__)
        stmt = stmt.where(*(model.__table__.c[k] == v for k, v in equals.items()))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar())

    def unrewarded(self, reward_model: str, rollout_keys: Sequence[str]) -> list[str]:
        """The rollout keys among ``rollout_keys`` that ``reward_model`` has not scored yet (in order)."""
        done: set[str] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(rollout_keys), _CHUNK):
                chunk = list(rollout_keys[start : start + _CHUNK])
                stmt = select(Reward.rollout_key).where(
                    Reward.reward_model == reward_model, Reward.rollout_key.in_(chunk)
                )
                done.update(conn.execute(stmt).scalars())
        return [k for k in rollout_keys if k not in done]

    def compare_runs(self, judge: str | None = None, run_keys: Sequence[str] | None = None) -> list[dict]:
        """Per (run_key, system, iteration): n, mean_reward, win_rate by ``judge``, tokens (summaries.compare_runs)."""
        return summaries.compare_runs(self.engine, judge, run_keys)

    def rollout_summary(self, reward_model: str, run_keys: Sequence[str] | None = None) -> list[dict]:
        """Per (run_key, system, iteration) over leaves scored by ``reward_model`` (summaries.rollout_summary)."""
        return summaries.rollout_summary(self.engine, reward_model, run_keys)


def open_store(url: str | None = None, workdir: str | os.PathLike | None = None) -> Store:
    """A Store at ``url``, or at the default SQLite file in ``workdir`` when no URL is given."""
    if url is None:
        if workdir is None:
            raise ValueError("open_store needs a url or a workdir")
        url = default_store_url(workdir)
    return Store(url)


# --------------------------------------------------------------------------- helpers

_upgrade_lock = threading.Lock()


def _normalise_url(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"store URL {url!r} is empty")
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3 is our driver
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(
            f"store URL {url!r} is malformed: expected 'sqlite:////abs/path/store.db' or "
            "'postgresql+psycopg://user:password@127.0.0.1:5432/dbname'"
        ) from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"store URL {url!r}: only sqlite and postgresql are supported")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return url


def _make_engine(url: str, echo: bool) -> Engine:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # concurrent readers while one thread writes
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, connect_args={"connect_timeout": 10})


def _record_version(conn, version: int, note: str) -> None:
    conn.execute(
        SchemaVersion.__table__.insert().values(
            version=version, applied_at=datetime.now(UTC).isoformat(timespec="seconds"), note=note
        )
    )


def _model(table: str) -> type[Base]:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown store table {table!r}; tables: {sorted(TABLES)}") from None


def _check_columns(model: type[Base], rows: Sequence[Mapping]) -> None:
    columns = set(model.__table__.c.keys())
    unknown = set().union(*(r.keys() for r in rows)) - columns
    if unknown:
        raise ValueError(
            f"unknown columns for {model.__tablename__}: {sorted(unknown)}; known: {sorted(columns)}"
        )


def _complete_rows(model: type[Base], rows: list[dict]) -> list[dict]:
    """Check names, demand required columns and fill the others with their defaults, so that every
    row has the same keys (one multi-VALUES statement per chunk needs that)."""
    if not rows:
        return rows
    _check_columns(model, rows)
    fill = {}
    required = []
    for column in model.__table__.c:
        if column.default is not None and column.default.is_scalar:
            fill[column.name] = column.default.arg
        elif column.nullable:
            fill[column.name] = None
        else:
            required.append(column.name)
    for row in rows:
        _require(row, required, model.__tablename__)
        for name, value in fill.items():
            row.setdefault(name, value)
    return rows


def _require(row: Mapping, keys: Sequence[str], table: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{table} row misses {missing}: {dict(row)}")
