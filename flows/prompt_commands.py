"""``spi prepare-prompts``: write a recipe's training prompts file (``spi.prompt_prep``).

    spi prepare-prompts --recipe paper --out prompts/ultrafeedback_train.jsonl
                        [--source HUB_ID_OR_FILE] [--split train_prefs] [--column prompt]
                        [--max-prompt-tokens 512] [--seed 1]

Lengths are counted in the recipe's policy tokenizer, on its chat template with its system message.
The recipe's ``prompts.train`` should then name the written file.
"""

from __future__ import annotations

from spi.prompt_prep import DEFAULT_SOURCE, DEFAULT_SPLIT


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-prompts",
        help="write a recipe's training prompts from a preference dataset (IRO: UltraFeedback)",
        description="Filter a dataset's prompts by length in the recipe's policy tokenizer, drop empty and "
        "repeated ones, shuffle them with a seed, and write JSONL that prompts.train reads.",
    )
    p.add_argument("--recipe", required=True, help="built-in recipe name or YAML file (its policy's tokenizer)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="hub dataset id, or a local .jsonl/.json/.parquet copy")
    p.add_argument("--split", default=DEFAULT_SPLIT, help="the hub dataset's split")
    p.add_argument("--column", default="prompt", help="the column holding the prompt text")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longest chat-templated prompt kept")
    p.add_argument("--seed", type=int, default=1, help="seed of the shuffle (IRO: 1)")
    p.set_defaults(func=cmd_prepare_prompts)


def cmd_prepare_prompts(args) -> int:
    from spi.config import load_recipe
    from spi.models import load_tokenizer
    from spi.prompt_prep import prepare_prompts

    if args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be at least 1, got {args.max_prompt_tokens}")
    recipe = load_recipe(args.recipe)
    done = prepare_prompts(args.source, args.out, load_tokenizer(recipe.policy.model), split=args.split,
                           column=args.column, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed,
                           system_message=recipe.policy.system_message)
    per = recipe.iterations.prompts_per_iteration
    print(f"wrote {done.kept} prompts to {done.path} (sha256 {done.digest}); read {done.read}, dropped "
          f"{done.too_long} longer than {args.max_prompt_tokens} tokens, {done.empty} empty, {done.repeated} "
          f"repeated; shuffled with seed {args.seed}")
    needed = recipe.prompts.offset + recipe.iterations.count * per
    if done.kept < needed:
        print(f"warning: recipe '{recipe.name}' needs {needed} prompts ({recipe.iterations.count} iterations x "
              f"{per} from offset {recipe.prompts.offset}); this file has {done.kept}")
    return 0
