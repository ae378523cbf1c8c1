"""The ``sedflow-jax`` command line: argument parsing, config files, and commands that wire
arguments to library calls (no science here)."""
from .main import main

__all__ = ["main"]
