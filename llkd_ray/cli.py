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
    _config_args(commands.add_parser("run", help="label, train and evaluate: the whole LLKD pipeline"))
    _config_args(commands.add_parser("label", help="pseudo-label the corpus with the teacher LLM"))
    _config_args(commands.add_parser("train", help="train and evaluate the student on the labels already stored"))
    _config_args(commands.add_parser("check-config", help="validate a config and print it resolved"))
    serve_parser = commands.add_parser("serve", help="serve a trained student over HTTP with Ray Serve")
    serve_parser.add_argument("student", help="a run directory (uses its student/) or an exported student directory")
    serve_parser.add_argument("--detach", action="store_true", help="deploy and return; the app keeps running")
    _config_args(serve_parser)
    submit_parser = commands.add_parser("submit", help="submit jobs/<job>.py to a Ray cluster (Job Submission API)")
    submit_parser.add_argument("job", choices=["label", "train", "run", "deploy"])
    submit_parser.add_argument("--address", help="the cluster's dashboard, e.g. http://head:8265 (or RAY_ADDRESS)")
    submit_parser.add_argument("--no-wait", action="store_true", help="return once submitted")
    args, job_args = parser.parse_known_args(argv)
    if args.command == "submit":
        from llkd_ray.submit import submit

        submit(args.job, job_args, args.address, wait=not args.no_wait)
        return 0
    if job_args:
        parser.error(f"unrecognized arguments: {' '.join(job_args)}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"llkd: {error}", file=sys.stderr)
        return 2
    try:
        _dispatch(args, cfg)
    except FileNotFoundError as error:  # a missing model, corpus, store or student: say which, no traceback
        print(f"llkd: {error}", file=sys.stderr)
        return 2
    return 0


def _dispatch(args: argparse.Namespace, cfg) -> None:
    if args.command == "check-config":
        import yaml

        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    elif args.command == "serve":
        from llkd_ray.ray_session import init_ray
        from llkd_ray.serving import resolve_student_dir, start_serving

        resolve_student_dir(args.student)
        init_ray(cfg.ray)
        print(f"[llkd] serving {args.student} on http://{cfg.serve.host}:{cfg.serve.port} (docs at /docs)"
              + ("" if args.detach else "; Ctrl-C stops"), flush=True)
        start_serving(args.student, cfg.serve, blocking=not args.detach)
    elif args.command == "label":
        from llkd_ray.labeling import run_labeling

        run_labeling(cfg)
    else:
        from llkd_ray.pipeline import run_pipeline

        run_pipeline(cfg, label=args.command == "run")


def run_as_job(command: str, *fixed: str) -> None:
    """The body of a jobs/*.py entry point: the same CLI, with the job's own arguments."""
    sys.exit(main([command, *fixed, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
