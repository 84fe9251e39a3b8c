"""`python -m vlm_rlaif <stage>`: a stage's computation in this process, without its notebook.

The notebooks call the same functions and add the metrics and figures. This entry serves
where a notebook does not go: each process of a multi-process run (`torchrun` or
`accelerate launch -m vlm_rlaif sft`, and `stage.launch`), a cluster job, a shell.

Exit status: 0 done; 2 bad or missing input (params, records, videos, model folders:
`InputError`, or a file an earlier stage writes), printed as one line that names what to fix; 3 the judge service failed; 130 interrupted.
Anything else is a bug and keeps its traceback (status 1).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

# stage -> (module, function of Params) run in this process; a training stage's function is
# what every one of its processes runs.
STAGES = {
    "prepare": ("prepare", "run"),
    "base": ("base", "materialise"),
    "sft": ("sft", "train"),
    "preferences": ("preferences", "judge_prompts"),
    "reward_model": ("reward_model", "train"),
    "ppo": ("ppo", "train_seeds"),
    "evaluate": ("evaluate", "run"),
}


def stage_function(name: str) -> Callable[[Any], Any]:
    module, function = STAGES[name]
    return getattr(importlib.import_module(f"vlm_rlaif.{module}"), function)


def stage_paths(parser: argparse.ArgumentParser, stage: str, given: list[str]) -> dict[str, Path]:
    """--path NAME=PATH arguments as the stage function's keyword arguments; a malformed one,
    or a name the function does not take, stops with a usage error."""
    accepted = set(inspect.signature(stage_function(stage)).parameters) - {"params"}
    paths = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not value:
            parser.error(f"--path {item!r}: expected NAME=PATH")
        if name not in accepted:
            parser.error(f"--path {name}: the {stage} stage takes {sorted(accepted)}")
        paths[name] = Path(value)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_rlaif", description="Run one stage of the VLM-RLAIF pipeline in this process.")
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml of the repo)")
    parser.add_argument("--path", action="append", default=[], metavar="NAME=PATH",
                        help="a path argument of the stage's function in place of its default (repeatable)")
    args = parser.parse_args(argv)
    paths = stage_paths(parser, args.stage, args.path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from vlm_rlaif import stage
    from vlm_rlaif.errors import InputError
    from vlm_rlaif.llm_client import LLMClientError

    where = f"python -m vlm_rlaif {args.stage}"
    try:
        params = stage.setup(os.path.abspath(args.params))
        stage_function(args.stage)(params, **paths)
    except (InputError, FileNotFoundError) as e:  # a missing input names itself: "run the prepare stage first"
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    except LLMClientError as e:
        print(f"{where}: judge service: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{where}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
