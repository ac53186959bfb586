"""The store's schema: its tables, the migrations that bring an older database up to SCHEMA_VERSION, and
the digests that name rollout leaves, instructions and outputs.

Every table's primary key is its natural key (so inserts are idempotent); mlflow_store.store is the handle
that creates, migrates and fills these tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 3


# --------------------------------------------------------------------------- tables


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """One row per schema version applied; the highest is the database's version."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[str] = mapped_column(String(40))
    note: Mapped[str] = mapped_column(Text, default="")


class RunSystemIteration:
    """The leading key of per-run rows: which run, which system (spi-k or a baseline), which iteration
    (sort_order puts these columns, and so the primary key's, first, as the tables were created)."""

    run_key: Mapped[str] = mapped_column(String(256), primary_key=True, sort_order=-1)
    system: Mapped[str] = mapped_column(String(64), primary_key=True, sort_order=-1)
    iteration: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, sort_order=-1)


class Prompt(Base):
    __tablename__ = "prompts"
    prompt_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(32), default="train")


class Rollout(RunSystemIteration, Base):
    """One leaf of a rollout: the row ``row_index`` generated for a prompt in (run, system, iteration)."""

    __tablename__ = "rollouts"
    prompt_key: Mapped[str] = mapped_column(String(256), primary_key=True)
    row_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    rollout_key: Mapped[str] = mapped_column(String(64), unique=True)  # rollout_key() of the natural key
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


class Generation(RunSystemIteration, Base):
    """One evaluation output of a system for one eval instruction, with its compute numbers."""

    __tablename__ = "generations"
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
    # schema v3:
    w2s_tokens: Mapped[int] = mapped_column(Integer, default=0)


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
    Migration(
        3,
        "generations: w2s_tokens, the weak-to-strong pair's tokens (both models)",
        ("ALTER TABLE generations ADD COLUMN w2s_tokens INTEGER NOT NULL DEFAULT 0",),
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
