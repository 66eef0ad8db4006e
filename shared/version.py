"""The one place the version lives (kept equal to pyproject.toml by a test)."""

__version__ = "0.1.0"
