"""Each stage of an experiment as one call: key from the table of stages, then the run's strategy.

:class:`FlowStages` is what ``spi.loop.iterate`` and the evaluation call. Every method computes the
stage's key with ``spi.stages`` (through ``spi.pipeline``'s key functions), names the output after it,
and runs the stage as the run context says: a plain call, a Prefect task, or sharded Prefect tasks on
the flow's Dask runner (``flows.sharded``). The result is the same dict in every case: path, digest,
key, seconds, computed, and the stage's numbers.
"""

from __future__ import annotations

from pathlib import Path

from flows import sharded
from flows import tasks as T
from flows.context import RunContext
from spi import pipeline
from spi.stagefiles import output_digest
from spi.stages import WHOLE, sharded_layout, stage_key


class FlowStages:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    # ----------------------------------------------------------------------- the iterations

    def rollouts(self, k: int, value_dirs: list[str]) -> dict:
        ctx = self.ctx
        if ctx.sharded:
            return sharded.rollouts(ctx, k, value_dirs)
        key = pipeline.rollouts_key(ctx.recipe, k, value_dirs)
        return ctx.run_stage(f"iteration-{k}/rollouts", T.rollouts_task, recipe=ctx.recipe, iteration=k,
                             value_dirs=value_dirs, out=str(ctx.dir / f"iteration-{k}" / f"rollouts-{key}.jsonl"), key=key)

    def labels(self, k: int, rollouts: dict) -> dict:
        ctx = self.ctx
        if ctx.sharded:
            return sharded.labels(ctx, k, rollouts)
        key = pipeline.labels_key(ctx.recipe, rollouts["path"])
        return ctx.run_stage(f"iteration-{k}/labels", T.labels_task, recipe=ctx.recipe, iteration=k,
                             rollouts=rollouts["path"], out=str(ctx.dir / f"iteration-{k}" / f"labels-{key}.jsonl"), key=key)

    def value(self, k: int, rollouts: dict, labels: dict) -> dict:
        """V_k is fitted by ONE task; on a Dask runner it is submitted to a worker (several devices)."""
        ctx = self.ctx
        key = pipeline.value_key(ctx.recipe, k, rollouts["path"], labels["path"])
        return ctx.run_stage(f"iteration-{k}/value", T.value_fit_task, on_worker=ctx.sharded, recipe=ctx.recipe,
                             iteration=k, rollouts=rollouts["path"], labels=labels["path"],
                             out=str(ctx.dir / f"iteration-{k}" / f"value-{key}"), key=key)

    # ----------------------------------------------------------------------- the evaluation

    def eval_set(self) -> dict:
        ctx = self.ctx
        source = Path(ctx.recipe.evaluation.eval_set).expanduser()
        key = stage_key("eval-set", ctx.recipe, source=output_digest(source) if source.is_file() else None)
        return ctx.run_stage("eval/eval-set", T.eval_set_task, recipe=ctx.recipe,
                             out=str(ctx.dir / "eval" / f"eval-set-{key}.json"), key=key)

    def references(self, eval_set: dict, generator: str, generated: dict) -> dict:
        ctx = self.ctx
        key = stage_key("references", ctx.recipe, eval_set=eval_set["digest"], generated=generated["digest"])
        return ctx.run_stage("eval/references", T.references_task, eval_set=eval_set["path"], generated=generated["path"],
                             generator=generator, out=str(ctx.dir / "eval" / f"references-{key}.json"), key=key)

    def decode(self, system: str, value_dirs: list[str], eval_set: dict) -> dict:
        ctx = self.ctx
        if ctx.sharded:
            return sharded.decode(ctx, system, value_dirs, eval_set)
        key = pipeline.decode_key(ctx.recipe, system, value_dirs, eval_set["digest"])
        return ctx.run_stage(f"eval/decode-{system}", T.decode_task, recipe=ctx.recipe, system=system,
                             value_dirs=value_dirs, eval_set=eval_set["path"],
                             out=str(ctx.dir / "eval" / f"{system.replace(':', '-')}-{key}.json"), key=key)

    def best_of_first(self, decoded: dict, n: int) -> dict:
        ctx, name = self.ctx, f"best-of-n:{n}"
        key = stage_key("best-of-first", ctx.recipe, n=n, source=decoded["digest"])
        return ctx.run_stage(f"eval/decode-{name}", T.best_of_first_task, source=decoded["path"], n=n,
                             out=str(ctx.dir / "eval" / f"{name.replace(':', '-')}-{key}.json"), key=key)

    def verify(self, system: str, eval_set: dict, decoded: dict) -> dict:
        """ifeval: one system's outputs checked by the verifiers (in this process; cheap)."""
        from spi.verifiers import checker_version

        ctx = self.ctx
        key = stage_key("verify", ctx.recipe, system=system, eval_set=eval_set["digest"],
                        outputs=decoded["digest"], checker=checker_version())
        return ctx.run_stage(f"eval/verify-{system}", T.verify_task, system=system, eval_set=eval_set["path"],
                             outputs=decoded["path"], out=str(ctx.dir / "eval" / f"verify-{system.replace(':', '-')}-{key}.json"),
                             key=key)

    def judge(self, system: str, references: dict, decoded: dict, allow_reward_judge: bool) -> dict:
        from evaluation.judges import judge_fingerprint

        ctx = self.ctx
        spec, reward = ctx.recipe.evaluation.judge, ctx.data["reward"]
        key = stage_key("judge", ctx.recipe, system=system, judge_model=judge_fingerprint(spec, reward),
                        references=references["digest"], outputs=decoded["digest"],
                        allow_reward_judge=allow_reward_judge,
                        layout=sharded_layout(ctx.recipe.execution.shard_prompts) if ctx.sharded else WHOLE)
        if ctx.sharded:
            return sharded.judge(ctx, system, references, decoded, key, allow_reward_judge)
        return ctx.run_stage(f"eval/judge-{system}", T.judge_task, system=system, eval_set=references["path"],
                             outputs=decoded["path"], judge=spec, reward=reward,
                             out=str(ctx.dir / "eval" / f"judge-{system}-{key}.json"), key=key,
                             cache=ctx.judge_cache, allow_reward_judge=allow_reward_judge)
