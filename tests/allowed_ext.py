"""A user's extension module for the --allow-import tests: importing it registers the callback `allowed_quiet`.

Imported only by the processes under test (a dashboard or agent started with --allow-import tests.allowed_ext), never
by pytest itself, so the registries of the test process keep their built-in names.
"""

from __future__ import annotations

from utp_dist import register_callback


@register_callback("allowed_quiet")
class Quiet:
    """A callback that observes nothing."""


class Unlisted:
    """Not registered: named by its import path tests.allowed_ext:Unlisted, which the module's prefix allows."""
