"""The ``spi`` command. Each area registers its own subcommands; this file only dispatches.

    spi run RECIPE            the experiment flow (flows.commands)
    spi prepare-prompts ...   a recipe's training prompts from a preference dataset (flows.prompt_commands)
    spi eval ...              AlpacaEval scoring, judges (evaluation.cli)
    spi bench ...             decoding, fitting, bf16-kernel and orchestration benchmarks (flows.bench)
    spi up | down | status    the local services (flows.stack.commands)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module exposes add_commands(subparsers); a missing module just means its commands are absent.
COMMAND_MODULES = ("flows.commands", "flows.prompt_commands", "evaluation.cli", "flows.bench",
                   "flows.stack.commands")

OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spi", description="Inference-time SPI experiment platform")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    from flows.commands import bad_input_errors, report_error

    try:
        return int(args.func(args) or 0)
    except bad_input_errors() as err:  # one `error:` line naming the field or file, never a traceback
        if os.environ.get("SPI_DEBUG"):
            raise
        return report_error(err)
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept and a rerun resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
