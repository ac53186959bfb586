"""Apply a fitted policy to new prompts: ``spi generate`` (the library part; the CLI is flows.commands).

    workdir_plan(recipe, workdir, system)   a system of an experiment's work directory: its value
                                             models V_1..V_m found from the stage files by their keys
    policy_plan(folder, recipe=None)        a guided policy folder (spi.systems.write_guided_policy):
                                             its system, value models and recorded recipe
    load_prompts(source)                    (text, key) of every prompt of any prompt set
    decode_batches(plan, texts, indices)    the decoded rows, batch by batch (``spi generate``, the
                                             registered pyfunc model and its server all decode here)
    decoding_recipe(recipe, plan)           a recipe that decodes exactly as the plan's recorded one
    generate(plan, prompts, out)            decode every prompt not yet in ``out``, appending in batches

Each prompt is decoded as the experiment's decode does (``spi.pipeline.decode_rows``): its seed is
``seed_for(recipe.seed, "eval", i)`` with ``i`` its position in the prompt set, so a prompt of the
experiment's evaluation set gets the experiment's own answer. Output: one JSON line per prompt,
{prompt, response, system} plus ``key`` when the prompt set has keys. A sidecar ``OUT.generate.json``
records the system's digest (the decode stage's key without the evaluation set: seed, policy, search,
sampling, reward, betas and the value models' checksums); a rerun skips the prompts already in OUT and
refuses an OUT written by another system or seed. Lines are appended in batches and flushed to disk,
so a run that dies loses at most the batch it was decoding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from spi.config import Recipe, load_recipe, parse_recipe
from spi.stagefiles import is_done, output_digest, write_json
from spi.stages import STAGES, WHOLE, field_value, sharded_layout, stage_key


class GenerateError(ValueError):
    """Input ``spi generate`` cannot use; the message names the file, system or iteration."""


@dataclass(frozen=True)
class Plan:
    """What decodes: the recipe (seed, policy, search, reward), the system and its value models."""

    recipe: Recipe
    system: str
    value_dirs: tuple[Path, ...]
    source: str  # where the system came from (a work directory or a guided policy folder)

    @property
    def digest(self) -> str:
        return stage_key("decode", self.recipe, system=self.system, eval_set="spi-generate",
                         value_models=[output_digest(d) for d in self.value_dirs], layout=WHOLE)

    def header(self) -> dict:
        return {"system": self.system, "digest": self.digest, "seed": self.recipe.seed,
                "recipe": self.recipe.name, "recipe_digest": self.recipe.digest, "source": self.source}


# --------------------------------------------------------------------------- which system


def _value_count(system: str, recipe: Recipe) -> int:
    from spi.systems import lookup, value_count

    try:
        lookup(system)
    except ValueError as err:
        raise GenerateError(str(err)) from None
    m = value_count(system)
    if m > recipe.iterations.count:
        raise GenerateError(f"system '{system}' reads V_1..V_{m}, but recipe '{recipe.name}' runs "
                            f"{recipe.iterations.count} iteration(s): iteration {m} was never run")
    return m


def recipe_of_workdir(workdir: Path) -> Recipe:
    """The built-in recipe whose finished run a work directory holds (its summary names it)."""
    summaries = sorted(Path(workdir).glob("*/summary-*.json")) + sorted(Path(workdir).glob("summary-*.json"))
    if not summaries:
        raise GenerateError(f"{workdir} holds no finished experiment (no <recipe>/summary-*.json); "
                            "pass --recipe to name the recipe whose stage files it holds")
    found = {(s["recipe"], s["digest"]) for s in (json.loads(p.read_text()) for p in summaries)}
    if len(found) > 1:
        raise GenerateError(f"{workdir} holds several experiments ({', '.join(sorted(n for n, _ in found))}); "
                            "pass --recipe to choose one")
    name, digest = found.pop()
    try:
        recipe = load_recipe(name)
    except ValueError:
        raise GenerateError(f"{workdir}: recipe '{name}' is not built in; pass --recipe with its YAML file") from None
    if recipe.digest != digest:
        raise GenerateError(f"{workdir}: the experiment ran recipe '{name}' with other settings (digest {digest}, "
                            f"built-in {recipe.digest}); pass --recipe with the YAML it ran")
    return recipe


def workdir_plan(recipe: Recipe, workdir: str | os.PathLike, system: str) -> Plan:
    """``system`` of the experiment ``recipe`` ran in ``workdir``: V_1..V_m are the value folders the
    stage keys name (rollouts -> labels -> value, iteration by iteration, unsharded or sharded)."""
    from spi import pipeline

    m = _value_count(system, recipe)
    root = Path(workdir).expanduser().resolve()
    if not root.is_dir():
        raise GenerateError(f"work directory {root} does not exist")
    folder = root / recipe.name if (root / recipe.name).is_dir() else root
    value_dirs: list[Path] = []
    for k in range(1, m + 1):
        found = None
        for layout in (WHOLE, sharded_layout(recipe.execution.shard_prompts)):
            key = pipeline.rollouts_key(recipe, k, value_dirs, layout)
            rollouts = folder / f"iteration-{k}" / f"rollouts-{key}.jsonl"
            if not is_done(rollouts, key):
                continue
            key = pipeline.labels_key(recipe, rollouts, layout)
            labels = folder / f"iteration-{k}" / f"labels-{key}.jsonl"
            if not is_done(labels, key):
                continue
            key = pipeline.value_key(recipe, k, rollouts, labels)
            if is_done(folder / f"iteration-{k}" / f"value-{key}", key):
                found = folder / f"iteration-{k}" / f"value-{key}"
                break
        if found is None:
            raise GenerateError(f"{folder} has no finished iteration {k} of recipe '{recipe.name}' ({recipe.digest}),"
                                f" which '{system}' needs: run `spi run` with this recipe and work directory first")
        value_dirs.append(found)
    return Plan(recipe, system, tuple(value_dirs), str(folder))


def policy_plan(folder: str | os.PathLike, recipe: Recipe | None = None) -> Plan:
    """The guided policy in ``folder``; its search settings come from the recipe recorded in it
    (``recipe`` stands in for a folder written before the recipe was recorded)."""
    from spi.systems import read_guided_policy

    folder = Path(folder)
    try:
        system, value_dirs, meta = read_guided_policy(folder)
    except FileNotFoundError as err:
        raise GenerateError(str(err)) from None
    if recipe is None:
        if "recipe" not in meta:
            raise GenerateError(f"{folder}/policy.json records no recipe (written by an older version): "
                                "pass --recipe with the recipe it was fitted with")
        recipe = parse_recipe(meta["recipe"], source=f"{folder}/policy.json")
    if recipe.policy.model != meta["base_model"]:
        raise GenerateError(f"{folder}: guided policy on base model '{meta['base_model']}', "
                            f"but the recipe's policy is '{recipe.policy.model}'")
    if len(value_dirs) != _value_count(system, recipe):
        raise GenerateError(f"{folder}: '{system}' reads {_value_count(system, recipe)} value models, "
                            f"the folder holds {len(value_dirs)}")
    missing = [str(d) for d in value_dirs if not (d / "value.json").is_file()]
    if missing:
        raise GenerateError(f"{folder}: value model folder(s) missing: {', '.join(missing)}")
    return Plan(recipe, system, tuple(value_dirs), str(folder))


def decoding_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """``recipe`` with every field the decode stage reads (``spi.stages``: seed, policy, sampling, search,
    backend, reward, betas, baseline settings) taken from ``plan.recipe``: an evaluation with ``recipe``'s
    eval set, judge and tracking decodes exactly the guided policy as it was registered."""
    data, theirs = recipe.model_dump(mode="json"), plan.recipe.model_dump(mode="json")
    for dotted in STAGES["decode"].fields:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = field_value(theirs, dotted)
    iterations = data["iterations"]  # count enters no decode key; the plan's betas must cover it
    iterations["count"] = min(iterations["count"], len(iterations["betas"]))
    return parse_recipe(data, source=f"recipe '{recipe.name}' with the decode settings of {plan.source}")


def decode_batches(plan: Plan, texts: list[str], indices: list[int], batch: int | None = None):
    """Yield (indices, rows) batch by batch: ``spi.pipeline.decode_rows``, the experiment's own decode, so
    prompt ``i`` of ``texts`` is sampled with the experiment's seed of evaluation prompt ``i``."""
    from spi import pipeline

    batch = batch or plan.recipe.search.batch_prompts
    for start in range(0, len(indices), batch):
        chunk = list(indices[start:start + batch])
        rows, _ = pipeline.decode_rows(plan.recipe, plan.system, list(plan.value_dirs), texts, chunk, progress=False)
        yield chunk, rows


# --------------------------------------------------------------------------- the prompts and the output


def load_prompts(source: str):
    """The prompt set (``spi.prompt_sets``) and its (text, key or None) pairs."""
    from spi.prompt_sets import load_prompt_set

    prompts = load_prompt_set(source)
    keys = [r.get("key") for r in prompts.records]
    return prompts, [(text, None if key is None else str(key)) for text, key in zip(prompts.texts, keys, strict=True)]


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".generate.json")


def check_output(plan: Plan, out: str | os.PathLike) -> set[str]:
    """The prompts ``out`` already answers; an error when it was written for another system or seed.
    A last line cut off by a killed run is dropped from the file."""
    out = Path(out)
    meta = sidecar(out)
    if not out.exists():
        return set()
    if not meta.exists():
        raise GenerateError(f"{out} exists but was not written by spi generate (no {meta.name}); "
                            "choose another --out or delete it")
    theirs, ours = json.loads(meta.read_text()), plan.header()
    if theirs.get("digest") != ours["digest"]:
        raise GenerateError(f"{out} holds outputs of {theirs.get('system')} (digest {theirs.get('digest')}, seed "
                            f"{theirs.get('seed')}, from {theirs.get('source')}), not of {ours['system']} (digest "
                            f"{ours['digest']}, seed {ours['seed']}): choose another --out or delete it")
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):  # the run died mid-line: drop the partial line
        data = data[:data.rfind(b"\n") + 1]
        out.write_bytes(data)
    done = set()
    for line_no, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add(row["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GenerateError(f"{out}:{line_no}: not a line of spi generate ({line[:60]!r}); "
                                "delete the file to start again") from None
    return done


def prepare(plan: Plan, prompts) -> None:
    """Whatever decoding these prompts needs beyond the recipe: a verifier reward learns their constraints."""
    from spi import pipeline

    if plan.recipe.reward.kind != "verifier":
        return
    reward = pipeline.load_reward_model(plan.recipe)
    if prompts.schema == "ifeval":
        reward.register(prompts.records)
    missing = [text for text in prompts.texts if text not in reward.constraints]
    if missing:
        raise GenerateError(f"{prompts.name}: the recipe's verifier reward scores every answer, but {len(missing)} "
                            f"prompts carry no constraints (first: {missing[0][:60]!r}); give IFEval-schema prompts")


def generate(plan: Plan, pairs: list[tuple[str, str | None]], out: str | os.PathLike, batch: int | None = None,
             progress: bool = True) -> dict:
    """Decode every prompt of ``pairs`` not yet in ``out``; append each batch of rows and flush it.
    Returns {"done": already there, "decoded": decoded now, "total"}."""
    from tqdm.auto import tqdm

    out = Path(out)
    done = check_output(plan, out)
    todo = [i for i, (text, _) in enumerate(pairs) if text not in done]
    texts = [text for text, _ in pairs]
    write_json(sidecar(out), plan.header())
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc=f"generate {plan.system}", unit="prompt",
               disable=not progress)
    with open(out, "a", encoding="utf-8") as fh, bar:
        for indices, rows in decode_batches(plan, texts, todo, batch):
            for row in rows:
                line = {"prompt": row["instruction"], "response": row["output"], "system": plan.system}
                if pairs[row["prompt_index"]][1] is not None:
                    line["key"] = pairs[row["prompt_index"]][1]
                fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(indices))
    return {"done": len(pairs) - len(todo), "decoded": len(todo), "total": len(pairs)}
