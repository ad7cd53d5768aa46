"""``llkd``: the command line. Each subcommand is a thin recipe over the library."""
from __future__ import annotations

import argparse
import sys

from llkd_ray.config import ConfigError, load_config


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the embedded default, Rotten Tomatoes)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.batch_size=32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llkd", description="LLM knowledge distillation on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    _config_args(commands.add_parser("label", help="pseudo-label the corpus with the teacher LLM"))
    _config_args(commands.add_parser("check-config", help="validate a config and print it resolved"))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"llkd: {error}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        return 0
    from llkd_ray.labeling import run_labeling

    run_labeling(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
