"""The SQLAlchemy store: prompts, rollouts, rewards, value-fit datasets, generations, judgements.

Every table's primary key is its natural key, so every bulk insert is idempotent (insert-or-ignore,
or upsert on request) on SQLite and PostgreSQL alike, and a rerun finds what is already done.
SQLite by default (``sqlite:///<workdir>/store.db``), PostgreSQL by URL
(``postgresql+psycopg://user@host:5432/db``). The schema is versioned: ``Store`` brings an older
database up to ``SCHEMA_VERSION`` through the ``MIGRATIONS`` list, keeping its rows.

Pass the URL between tasks, not a Store object.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    Float,
    Integer,
    String,
    Text,
    and_,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2
_CHUNK = 500


class StoreError(RuntimeError):
    """The store URL is malformed, unreachable, or its schema cannot be used by this code."""


# --------------------------------------------------------------------------- tables


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row per schema version applied; the highest is the database's version."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[str] = mapped_column(String(40))
    note: Mapped[str] = mapped_column(Text, default="")


class Prompt(Base):
    __tablename__ = "prompts"
    prompt_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(32), default="train")


class Rollout(Base):
    """One leaf of a rollout: the row ``row_index`` generated for a prompt in (run, system, iteration)."""

    __tablename__ = "rollouts"
    run_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    system: Mapped[str] = mapped_column(String(64), primary_key=True)
    iteration: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    prompt_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    row_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    rollout_key: Mapped[str] = mapped_column(String(64), unique=True)  # digest of the five above
    text: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int] = mapped_column(Integer)


class Reward(Base):
    """The score of one rollout leaf by one reward model (``reward_model`` = its identity/digest)."""

    __tablename__ = "rewards"
    reward_model: Mapped[str] = mapped_column(String(256), primary_key=True)
    rollout_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    reward: Mapped[float] = mapped_column(Float)


class ValueDataset(Base):
    """A value-fit dataset written to ``path``, named by its content digest."""

    __tablename__ = "value_datasets"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    run_key: Mapped[str] = mapped_column(String(256), default="")
    iteration: Mapped[int] = mapped_column(Integer, default=0)
    n_examples: Mapped[int] = mapped_column(Integer, default=0)


class Generation(Base):
    """One evaluation output of a system for one eval instruction, with its compute numbers."""

    __tablename__ = "generations"
    run_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    system: Mapped[str] = mapped_column(String(64), primary_key=True)
    iteration: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    instruction_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    instruction_digest: Mapped[str] = mapped_column(String(64), index=True)
    output: Mapped[str] = mapped_column(Text)
    output_digest: Mapped[str] = mapped_column(String(64), index=True)
    policy_tokens: Mapped[int] = mapped_column(Integer, default=0)
    value_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reward_tokens: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # schema v2:
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_model: Mapped[str | None] = mapped_column(String(256), nullable=True)


class Judgement(Base):
    """A judge's preference between output_1 (reference) and output_2 (ours): 1 = output_1 better,
    2 = output_2 better (AlpacaEval's convention), fractional values allowed."""

    __tablename__ = "judgements"
    judge: Mapped[str] = mapped_column(String(256), primary_key=True)
    instruction_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    output_1_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    output_2_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    preference: Mapped[float] = mapped_column(Float)


TABLES = {m.__tablename__: m for m in (Prompt, Rollout, Reward, ValueDataset, Generation, Judgement)}


# --------------------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    """Statements that take a database from ``version - 1`` to ``version`` (portable SQL only)."""

    version: int
    note: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        2,
        "generations: reward and reward_model of the eval output",
        (
            "ALTER TABLE generations ADD COLUMN reward FLOAT",
            "ALTER TABLE generations ADD COLUMN reward_model VARCHAR(256)",
        ),
    ),
)
assert MIGRATIONS[-1].version == SCHEMA_VERSION


# --------------------------------------------------------------------------- keys and digests


def text_digest(text: str) -> str:
    """sha256 hex of a UTF-8 text: the digest used for instructions and outputs."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def rollout_key(run_key: str, system: str, iteration: int, prompt_key: str, row_index: int) -> str:
    """The key of one rollout leaf (what rewards refer to): a digest of its natural key."""
    raw = "\x1f".join([run_key, system, str(int(iteration)), prompt_key, str(int(row_index))])
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


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
        instruction (text); optional policy_tokens, value_tokens, reward_tokens, seconds, reward,
        reward_model. output_digest is derived from output."""
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
        """Per (run_key, system, iteration) over generations: n, mean_reward, win_rate (100 * mean
        preference - 1 by ``judge``, over judged outputs), n_judged, mean/total policy tokens.

        ``judge`` may be left out only when the store holds judgements of at most one judge.
        """
        if judge is None:
            with self.engine.connect() as conn:
                judges = list(conn.execute(select(Judgement.judge).distinct()).scalars())
            if len(judges) > 1:
                raise ValueError(f"several judges in the store, name one: {sorted(judges)}")
        pref = select(
            Judgement.instruction_digest,
            Judgement.output_2_digest,
            func.avg(Judgement.preference).label("preference"),
        )
        if judge is not None:
            pref = pref.where(Judgement.judge == judge)
        pref = pref.group_by(Judgement.instruction_digest, Judgement.output_2_digest).subquery()
        g = Generation
        stmt = (
            select(
                g.run_key,
                g.system,
                g.iteration,
                func.count().label("n"),
                func.avg(g.reward).label("mean_reward"),
                (100.0 * func.avg(pref.c.preference - 1.0)).label("win_rate"),
                func.count(pref.c.preference).label("n_judged"),
                func.avg(g.policy_tokens).label("mean_policy_tokens"),
                func.sum(g.policy_tokens).label("total_policy_tokens"),
                func.sum(g.seconds).label("total_seconds"),
            )
            .outerjoin(
                pref,
                and_(
                    pref.c.instruction_digest == g.instruction_digest,
                    pref.c.output_2_digest == g.output_digest,
                ),
            )
            .group_by(g.run_key, g.system, g.iteration)
            .order_by(g.run_key, g.system, g.iteration)
        )
        if run_keys is not None:
            stmt = stmt.where(g.run_key.in_(list(run_keys)))
        with self.engine.connect() as conn:
            out = []
            for r in conn.execute(stmt):
                row = dict(r._mapping)
                for k in ("mean_reward", "win_rate", "mean_policy_tokens", "total_seconds"):
                    row[k] = float(row[k]) if row[k] is not None else None
                row["total_policy_tokens"] = int(row["total_policy_tokens"] or 0)
                out.append(row)
            return out

    def rollout_summary(self, reward_model: str, run_keys: Sequence[str] | None = None) -> list[dict]:
        """Per (run_key, system, iteration) over rollout leaves scored by ``reward_model``: n_leaves,
        n_prompts, mean_reward, mean_best_reward (best leaf per prompt, as SPI's labelling keeps),
        mean_tokens."""
        r = Rollout
        scored = select(r.run_key, r.system, r.iteration, r.prompt_key, r.n_tokens, Reward.reward).join(
            Reward, and_(Reward.rollout_key == r.rollout_key, Reward.reward_model == reward_model)
        )
        if run_keys is not None:
            scored = scored.where(r.run_key.in_(list(run_keys)))
        scored = scored.subquery()
        best = (
            select(
                scored.c.run_key,
                scored.c.system,
                scored.c.iteration,
                scored.c.prompt_key,
                func.max(scored.c.reward).label("best"),
            )
            .group_by(scored.c.run_key, scored.c.system, scored.c.iteration, scored.c.prompt_key)
            .subquery()
        )
        per_group = lambda q: (q.c.run_key, q.c.system, q.c.iteration)  # noqa: E731
        leaves = (
            select(
                *per_group(scored),
                func.count().label("n_leaves"),
                func.avg(scored.c.reward).label("mean_reward"),
                func.avg(scored.c.n_tokens).label("mean_tokens"),
            )
            .group_by(*per_group(scored))
            .subquery()
        )
        prompts = (
            select(
                *per_group(best),
                func.count().label("n_prompts"),
                func.avg(best.c.best).label("mean_best_reward"),
            )
            .group_by(*per_group(best))
            .subquery()
        )
        stmt = (
            select(leaves, prompts.c.n_prompts, prompts.c.mean_best_reward)
            .join(
                prompts, and_(*(a == b for a, b in zip(per_group(leaves), per_group(prompts), strict=True)))
            )
            .order_by(*per_group(leaves))
        )
        with self.engine.connect() as conn:
            out = []
            for row in conn.execute(stmt):
                d = dict(row._mapping)
                for k in ("mean_reward", "mean_tokens", "mean_best_reward"):
                    d[k] = float(d[k])
                out.append(d)
            return out


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
