"""The package version (one place; the top-level package and saved files read it here)."""
__version__ = "0.1.0"
