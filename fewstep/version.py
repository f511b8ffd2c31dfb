"""The package version, read by the tools that report it (bench, eval)."""

__version__ = "0.1.0"
