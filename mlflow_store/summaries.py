"""The store's summaries: per (run, system, iteration) figures computed in SQL over generations and
judgements (compare_runs) or over rollout leaves and their rewards (rollout_summary). Store.compare_runs
and Store.rollout_summary call these with the store's engine."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine

from mlflow_store.schema import Generation, Judgement, Reward, Rollout


def compare_runs(
    engine: Engine, judge: str | None = None, run_keys: Sequence[str] | None = None
) -> list[dict]:
    """Per (run_key, system, iteration) over generations: n, mean_reward, win_rate (100 * mean
    preference - 1 by ``judge``, over judged outputs), n_judged, mean/total policy tokens.

    ``judge`` may be left out only when the store holds judgements of at most one judge.
    """
    if judge is None:
        with engine.connect() as conn:
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
    with engine.connect() as conn:
        out = []
        for r in conn.execute(stmt):
            row = dict(r._mapping)
            for k in ("mean_reward", "win_rate", "mean_policy_tokens", "total_seconds"):
                row[k] = float(row[k]) if row[k] is not None else None
            row["total_policy_tokens"] = int(row["total_policy_tokens"] or 0)
            out.append(row)
        return out


def rollout_summary(engine: Engine, reward_model: str, run_keys: Sequence[str] | None = None) -> list[dict]:
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
        .join(prompts, and_(*(a == b for a, b in zip(per_group(leaves), per_group(prompts), strict=True))))
        .order_by(*per_group(leaves))
    )
    with engine.connect() as conn:
        out = []
        for row in conn.execute(stmt):
            d = dict(row._mapping)
            for k in ("mean_reward", "mean_tokens", "mean_best_reward"):
                d[k] = float(d[k])
            out.append(d)
        return out
