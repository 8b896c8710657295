"""The package version, recorded in every run's run.json (pyproject.toml holds the same)."""

__version__ = "0.1.0"
