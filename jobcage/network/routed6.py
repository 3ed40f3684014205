"""IPv6 routed mode: the site routes ``ipv6_pool`` (a global prefix) to the node, each
cage gets a /64 of it, and there is no NAT66: the job's address is what the far end
sees. Where the site's router treats the prefix as on the node's link rather than
routed through it, it asks for each job's address by neighbour solicitation on the
uplink; the node answers for it (a proxy neighbour entry per cage on the uplink, and
``proxy_ndp`` on the uplink, saved and put back like forwarding: see :mod:`.ipv6`).
"""

from __future__ import annotations

import errno
import ipaddress

from ..errors import NetworkError
from ..netlink import core, rtnl
from . import hooks


def _uplink_index(nl: rtnl.Socket, uplink: str) -> int:
    request = rtnl.get_link(name=uplink)
    (answer,) = nl.talk([request])
    if answer.error == errno.ENODEV or not answer.replies:
        raise NetworkError(
            f"the uplink {uplink!r} of the IPv6 routed mode is gone; set `uplink` to the "
            "interface the site routes ipv6_pool to"
        )
    rtnl.raise_first_error([request], [answer])
    return rtnl.ifinfo_index(answer.replies[0])


def add_proxy(uplink: str, address: ipaddress.IPv6Address) -> None:
    """The node answers neighbour solicitations for ``address`` on ``uplink``."""
    hooks.check()
    what = f"adding a proxy neighbour entry for {address} on {uplink}"
    try:
        with rtnl.Socket() as nl:
            index = _uplink_index(nl, uplink)
            nl.check([rtnl.proxy_neighbour(index, address, add=True, what=what)])
    except core.NetlinkError as e:
        raise NetworkError(f"{e}; check `ip -6 neigh show proxy dev {uplink}`") from e


def remove_proxy(uplink: str, address: ipaddress.IPv6Address) -> None:
    """Idempotent: an entry (or uplink) already gone is fine."""
    hooks.check()
    what = f"removing the proxy neighbour entry for {address} on {uplink}"
    try:
        with rtnl.Socket() as nl:
            request = rtnl.get_link(name=uplink)
            (answer,) = nl.talk([request])
            if answer.error == errno.ENODEV or not answer.replies:
                return  # the uplink went, and its entries with it
            index = rtnl.ifinfo_index(answer.replies[0])
            request = rtnl.proxy_neighbour(index, address, add=False, what=what)
            (answer,) = nl.talk([request])
            if answer.error not in (0, errno.ENOENT):
                rtnl.raise_first_error([request], [answer])
    except core.NetlinkError as e:
        raise NetworkError(
            f"{e}; remove it with `ip -6 neigh del proxy {address} dev {uplink}`"
        ) from e


def proxies(uplink: str) -> set[ipaddress.IPv6Address]:
    """The addresses the node answers for on ``uplink`` (empty if it is gone)."""
    try:
        with rtnl.Socket() as nl:
            request = rtnl.get_link(name=uplink)
            (answer,) = nl.talk([request])
            if answer.error == errno.ENODEV or not answer.replies:
                return set()
            index = rtnl.ifinfo_index(answer.replies[0])
            entries = nl.dump(rtnl.dump_proxy_neighbours())
    except core.NetlinkError as e:
        raise NetworkError(f"listing the proxy neighbour entries on {uplink}: {e}") from e
    found = set()
    for message in entries:
        at, dst = rtnl.proxy_neighbour_fields(message)
        if at == index and len(dst) == 16:
            found.add(ipaddress.IPv6Address(dst))
    return found
