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
import inspect
import os
import sys
from pathlib import Path

from vlm_rlaif import stage
from vlm_rlaif.errors import InputError
from vlm_rlaif.llm_client import LLMClientError


def stage_paths(parser: argparse.ArgumentParser, name: str, given: list[str]) -> dict[str, Path]:
    """--path NAME=PATH arguments as the stage function's keyword arguments; a malformed one,
    or a name the function does not take, stops with a usage error."""
    accepted = set(inspect.signature(stage.stage_function(name)).parameters) - {"params"}
    paths = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not value:
            parser.error(f"--path {item!r}: expected NAME=PATH")
        if key not in accepted:
            parser.error(f"--path {key}: the {name} stage takes {sorted(accepted)}")
        paths[key] = Path(value)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_rlaif", description="Run one stage of the VLM-RLAIF pipeline in this process.")
    parser.add_argument("stage", choices=list(stage.STAGES))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml of the repo)")
    parser.add_argument("--path", action="append", default=[], metavar="NAME=PATH",
                        help="a path argument of the stage's function in place of its default (repeatable)")
    args = parser.parse_args(argv)
    paths = stage_paths(parser, args.stage, args.path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    where = f"python -m vlm_rlaif {args.stage}"
    try:
        params = stage.setup(os.path.abspath(args.params))
        stage.stage_function(args.stage)(params, **paths)
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
