"""Ray Job entry point: `ray job submit --working-dir . -- python jobs/label.py [--config FILE] [key=value ...]`."""

from llkd_ray.cli import run_as_job

if __name__ == "__main__":
    run_as_job("label")
