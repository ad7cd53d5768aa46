"""Ray Job entry point that deploys a trained student with Ray Serve and returns (the app keeps running):
`ray job submit --working-dir . -- python jobs/deploy.py RUN_DIR_OR_STUDENT [--config FILE] [serve.port=8000 ...]`."""

from llkd_ray.cli import run_as_job

if __name__ == "__main__":
    run_as_job("serve", "--detach")
