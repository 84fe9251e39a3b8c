"""Write the synthetic world: `python -m vlm_rlaif.synthetic --params params.yaml --out data`."""

from __future__ import annotations

import argparse
import sys
import time

from vlm_rlaif.config import load_params
from vlm_rlaif.synthetic.world import generate_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_rlaif.synthetic", description="Write the synthetic video world.")
    parser.add_argument("--params", default="params.yaml", help="params file whose `world` section configures the world")
    parser.add_argument("--out", default="data", help="folder to write videos/, the SFT, RL and eval files into")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        world = load_params(args.params).world
        if world is None:
            raise ValueError(f"{args.params}: no `world` section; the synthetic world needs one")
        counts = generate_world(world, args.out, progress=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    videos = ", ".join(f"{n} {split}" for split, n in counts["videos"].items())
    print(f"wrote {args.out}: videos {videos}; {counts['SFT_short.json']} short QA, {counts['SFT_long.json']} descriptions, "
          f"{counts['SFT_judge.json']} judge examples, {counts['RL_data.json']} RL prompts in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
