"""`r3-train --config CONFIG.yaml [--resume] [--set KEY=VALUE ...]` and `r3-train --plot LOG.jsonl`."""

from __future__ import annotations

import argparse
import sys

from r3_trainer.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r3-train", description="PPO with rewards from an r3 service.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="YAML config (see trainer/configs/example.yaml)")
    what.add_argument("--plot", metavar="LOG.jsonl", help="only plot a training log")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value; dotted keys for nested ones), repeatable")
    parser.add_argument("--out", help="with --plot: the PNG to write (default: LOG.png)")
    args = parser.parse_args(argv)

    if args.plot:
        from pathlib import Path

        from r3_trainer.plot import plot_log

        out = plot_log(args.plot, args.out or Path(args.plot).with_suffix(".png"))
        print(out)
        return 0

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"r3-train: {exc}", file=sys.stderr)
        return 2

    from r3_trainer.rewards import RewardServiceError
    from r3_trainer.trainer import PPOTrainer

    try:
        trainer = PPOTrainer(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as exc:  # checkpoints there / none to resume from
        print(f"r3-train: {exc}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except RewardServiceError as exc:
        print(f"r3-train: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
