"""The package version, apart from utp_dist/__init__.py so that modules the package imports can read it."""

__version__ = "0.2.0"
