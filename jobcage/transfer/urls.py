"""The transfer URLs the plugin answers, and where each puts the instance.

* ``cow://<absolute base path>`` (``cow:///images/el9.qcow2``): the instance is made at
  the destination HTCondor gives (the job's scratch directory plus the URL's last path
  component, unless the submit file remaps it). The clear form; use it for new jobs.
* ``nfs:<absolute base path>:<instance file name>`` (the historical form of HTCondor's
  VM universe sites): the instance is made in the destination's directory under
  ``<instance file name>``, whatever name HTCondor derived for the destination.

Both name the base by an absolute path on shared storage; the instance is always qcow2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote

from ..errors import TransferError

METHODS = ("cow", "nfs")


@dataclass(frozen=True)
class CowRequest:
    url: str
    base: str
    dest: str


def parse(url: str, dest: str) -> CowRequest:
    """What ``url`` asks for, with ``dest`` the destination HTCondor gave."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme.lower() not in METHODS:
        raise TransferError(
            f"URL {url!r} is not one this plugin answers: use cow://<absolute base path> "
            "or nfs:<absolute base path>:<instance file name>"
        )
    if scheme.lower() == "cow":
        if not rest.startswith("///"):
            raise TransferError(
                f"URL {url!r} has no absolute path after cow://: write cow:///path/to/base"
            )
        return CowRequest(url, unquote(rest[2:]), dest)
    base, sep, instance = rest.rpartition(":")
    if not sep or not base or not instance:
        raise TransferError(
            f"URL {url!r} is not nfs:<absolute base path>:<instance file name>: "
            "the instance file name after the last ':' is missing"
        )
    if "/" in instance or instance in {".", ".."}:
        raise TransferError(
            f"URL {url!r} names the instance {instance!r}: give a file name without '/'"
        )
    return CowRequest(url, base, os.path.join(os.path.dirname(dest), instance))
