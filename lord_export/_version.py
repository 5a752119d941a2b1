"""The package version (its own module, so that modules can read it without importing the package facade)."""

__version__ = "0.3.4"
