"""llkd-ray: an LLM teacher pseudo-labels unlabeled text, a small student trains on an adaptively selected subset,
Ray Serve exposes it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llkd-ray")  # one source: pyproject.toml
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
