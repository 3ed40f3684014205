"""A network cage's resolv.conf: when the node's resolver is on loopback (the job's
own ``lo`` inside its netns), the cage gets a file of its own in /etc/netns/NAME,
where `ip netns exec` looks too and spawn bind-mounts it from."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Sequence

NETNS_ETC_DIR = "/etc/netns"
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_RESOLV_CONF = "/run/systemd/resolve/resolv.conf"


def _nameservers(text: str) -> list[str]:
    servers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append(fields[1])
    return servers


def _is_loopback(server: str) -> bool:
    try:
        return ipaddress.ip_address(server.split("%")[0]).is_loopback
    except ValueError:
        return False


def _is_ipv4(server: str) -> bool:
    try:
        return ipaddress.ip_address(server).version == 4
    except ValueError:
        return False


def plan_resolv_conf(
    node_text: str,
    resolved_text: str | None,
    fallback_servers: Sequence[str] = (),
    *,
    ipv6: bool = False,
) -> str | None:
    """The resolv.conf a cage needs, or None when the node's own works from inside.

    A loopback resolver (systemd-resolved's 127.0.0.53, a local dnsmasq) is the job's
    own ``lo`` inside the netns. Then, like `ip netns exec` with /etc/netns/NAME, the
    job gets: systemd-resolved's list of upstream servers if it has one, else the
    node's file without its loopback servers plus ``fallback_servers``. IPv6 servers
    are kept for a dual-stack cage (``ipv6``) and dropped otherwise (no way to them);
    a link-local one (``fe80::1%eth0``) always, as the node's links are not the cage's.
    """
    servers = _nameservers(node_text)
    if not any(_is_loopback(s) for s in servers):
        return None

    def usable(server: str) -> bool:
        return (_is_ipv4(server) or (ipv6 and _is_global6(server))) and not _is_loopback(server)

    if resolved_text is not None:
        upstream = [s for s in _nameservers(resolved_text) if usable(s)]
        if upstream:
            return _only_servers(resolved_text, upstream)
    kept = [s for s in servers if usable(s)]
    kept += [s for s in fallback_servers if s not in kept and (ipv6 or _is_ipv4(s))]
    text = _only_servers(node_text, kept)
    if not kept:
        text = (
            "# JobCage: the node's resolver listens on loopback only and no other server "
            "is known; set dns_servers in the JobCage config\n" + text
        )
    return text


def _is_global6(server: str) -> bool:
    """An IPv6 server a cage can reach through the node: not link-local (a zone)."""
    try:
        address = ipaddress.ip_address(server)
    except ValueError:
        return False
    return address.version == 6 and not address.is_link_local


def _only_servers(text: str, servers: Sequence[str]) -> str:
    lines = [line for line in text.splitlines() if line.split()[:1] != ["nameserver"]]
    header = "# Written by JobCage for a network cage (the node's resolver is on loopback)"
    return "\n".join([header, *lines, *(f"nameserver {s}" for s in servers)]) + "\n"


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def write_resolv_conf(netns_name: str, text: str) -> str:
    """Write /etc/netns/NAME/resolv.conf, where `ip netns exec` looks too."""
    directory = os.path.join(NETNS_ETC_DIR, netns_name)
    # A concurrent teardown may rmdir an empty /etc/netns between makedirs' steps.
    for _ in range(3):
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            break
        except FileNotFoundError:
            continue
    path = os.path.join(directory, "resolv.conf")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def remove_resolv_conf(netns_name: str) -> None:
    directory = os.path.join(NETNS_ETC_DIR, netns_name)
    for name in ("resolv.conf", "resolv.conf.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)
    # /etc/netns is made on demand; leave the node as it was when it is empty.
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(NETNS_ETC_DIR)
