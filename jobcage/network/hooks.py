"""A single hook run before JobCage changes anything in a network namespace.

The library leaves it empty. The test suite installs a guard that refuses to run in
the machine's own network namespace, so that a bug in a fixture can never reach the
shared machine's real rules, links or sysctls: every kernel-changing path of
``netns`` and ``firewall`` calls :func:`check` first.
"""

from __future__ import annotations

from collections.abc import Callable

before_change: Callable[[], None] | None = None


def check() -> None:
    if before_change is not None:
        before_change()
