"""``llkd``: the command line. Each subcommand is a thin recipe over the library.

Options and ``key=value`` overrides mix in any order, as with ``ray`` and ``torchrun``: a ``key=value`` token is an
override wherever it stands, unless it is the value of an option (``--config a=b.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from llkd_ray import __version__
from llkd_ray.config import ConfigError, load_config
from llkd_ray.errors import UserError

logger = logging.getLogger("llkd_ray")
OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*=")
OPTIONS_WITH_VALUES = ("--config", "--address")
CONSOLE_COMMANDS = ("run", "label", "train", "serve")  # quiet terminal, full log in the run directory


def split_overrides(argv: list[str], options_with_values=OPTIONS_WITH_VALUES) -> tuple[list[str], list[str]]:
    """(the other arguments, the key=value overrides), each in its original order."""
    rest, overrides = [], []
    for position, token in enumerate(argv):
        after_option = position > 0 and argv[position - 1] in options_with_values
        (overrides if OVERRIDE.match(token) and not after_option else rest).append(token)
    return rest, overrides


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the embedded default, Rotten Tomatoes)")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Ray's, vLLM's and DeepSpeed's own logs in the terminal too"
    )
    parser.epilog = "Overrides: key=value anywhere on the line, e.g. teacher.batch_size=32 training.epochs=3"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llkd", description="LLM knowledge distillation on Ray")
    parser.add_argument("--version", action="version", version=f"llkd-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _common_args(commands.add_parser("run", help="label, train and evaluate: the whole LLKD pipeline"))
    _common_args(commands.add_parser("label", help="pseudo-label the corpus with the teacher LLM"))
    _common_args(commands.add_parser("train", help="train and evaluate the student on the labels already stored"))
    _common_args(commands.add_parser("check-config", help="validate a config and print it resolved"))
    serve_parser = commands.add_parser("serve", help="serve a trained student over HTTP with Ray Serve")
    serve_parser.add_argument(
        "student", nargs="?", help="a run directory (uses its student/) or an exported student directory"
    )
    mode = serve_parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--detach",
        action="store_true",
        help="deploy and return; the endpoint keeps running (on a local cluster started for it if none is running)",
    )
    mode.add_argument(
        "--stop",
        action="store_true",
        help="stop a detached endpoint (and the local cluster `--detach` started, if it did)",
    )
    _common_args(serve_parser)
    submit_parser = commands.add_parser("submit", help="submit jobs/<job>.py to a Ray cluster (Job Submission API)")
    submit_parser.add_argument("job", choices=["label", "train", "run", "deploy"])
    submit_parser.add_argument("--address", help="the cluster's dashboard, e.g. http://head:8265 (or RAY_ADDRESS)")
    submit_parser.add_argument("--no-wait", action="store_true", help="return once submitted")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args, unknown = parser.parse_known_args(rest)
    if args.command == "submit":
        from llkd_ray.console import console
        from llkd_ray.submit import submit

        with console(None):  # the job's own log streams to this terminal: nothing to keep aside
            submit(args.job, unknown + overrides, args.address, wait=not args.no_wait)
        return 0
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve" and not args.stop and not args.student:
        parser.error("serve: give a run directory or an exported student (or --stop)")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"llkd: {error}", file=sys.stderr)
        return 2
    if args.command not in CONSOLE_COMMANDS:
        return _dispatch(args, cfg)

    from llkd_ray.console import console
    from llkd_ray.storage import command_log

    log_file = command_log(cfg.output.dir, cfg.output.name, args.command)
    with console(log_file, verbose=args.verbose):
        try:
            return _dispatch(args, cfg)
        except (FileNotFoundError, PermissionError, UserError) as error:  # the user's to fix: say what, no traceback
            logger.error("%s", error)
            return 2
        except KeyboardInterrupt:
            logger.error("interrupted: run the same command again to resume where it stopped")
            return 130
        except Exception as error:
            logging.getLogger("llkd.traceback").exception("failed")  # outside llkd_ray: to the log file only
            logger.error(
                "failed: %s: %s (the traceback is in %s)",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
                log_file,
            )
            return 1


def _dispatch(args: argparse.Namespace, cfg) -> int:
    if args.command == "check-config":
        import yaml

        from llkd_ray.console import stdout_to_stderr
        from llkd_ray.teacher import labeling_cost_note

        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), flush=True)
        with stdout_to_stderr():  # stdout is the YAML alone (`> resolved.yaml`): libraries print while loading
            try:
                note = labeling_cost_note(cfg)
            except Exception as error:  # an unreachable hub id, say: the config itself is still valid
                note = f"could not load the teacher's tokenizer to count label tokens: {error}"
        print(f"llkd: {note}", file=sys.stderr)
        if cfg.labeling.budget is not None:
            from llkd_ray.acquisition import budget_note

            print(f"llkd: {budget_note(cfg.labeling, cfg.evaluation.holdout)}", file=sys.stderr)
    elif args.command == "serve":
        from llkd_ray.serving import serve_command

        serve_command(args.student, cfg, detach=args.detach, stop=args.stop)
    elif args.command == "label":
        from llkd_ray.labeling import run_labeling

        run_labeling(cfg)
    else:
        from llkd_ray.pipeline import run_pipeline

        run_pipeline(cfg, label=args.command == "run")
    return 0


def run_as_job(command: str, *fixed: str) -> None:
    """The body of a jobs/*.py entry point: the same CLI, with the job's own arguments."""
    sys.exit(main([command, *fixed, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
