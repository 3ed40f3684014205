"""Netlink, spoken directly: one core and the two families JobCage needs.

``core``       framing, the attribute codec, extended-ack errors (one
               :class:`~.core.NetlinkError`), the EPERM -> CAP_NET_ADMIN message, sockets
``rtnl``       rtnetlink: links, veths, addresses, routes, forwarding (batched requests)
``nfnl``       nf_tables messages and the wire form of a transaction
``nfexpr``     nf_tables rule expressions
``nfchannel``  nf_tables transactions and reads over one kept socket

Hand-written encoders rather than pyroute2's message classes or libnftables: why, and
what it saves, is in :mod:`.rtnl` and :mod:`.nfnl`. Nothing here knows what a cage is;
:mod:`jobcage.network` does.
"""

from .core import NetlinkError

__all__ = ["NetlinkError"]
