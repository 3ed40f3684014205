"""What a dead owner left: JobCage's netns, veths, rules, proxy entries, leases and
IPv6 sysctls that no cage record of the state dir claims (listed for `jobcage reap`,
which decides what to remove), and removing one of them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Config
from ..errors import JobCageError, NetworkError
from ..ids import is_job_id, veth_names
from ..ids import netns_name as make_netns_name
from ..records import StateStore
from . import ipv6 as ipv6_mod
from . import netns, resolv
from .addresses import AddressPool, LeaseStore
from .cage import cage_hash
from .firewall import CAGE, FirewallObject, all_firewalls, firewall_for_table


@dataclass(frozen=True)
class Orphan:
    """A JobCage-named kernel object that no cage record claims."""

    kind: str  # "netns", "veth", "chain" (a cage's rules), "lease", "shared", "campus"
    name: str
    table: str | None = None
    # The hash of the job a veth, chain or lease belongs to: reap keeps a lease while
    # any other object of its job could not be removed, as the lease is what makes
    # them this state dir's.
    cage: str = ""


def find_orphans(config: Config) -> list[Orphan]:
    """JobCage netns, veths, chains and leases with no cage record in the state dir.

    Run in the node's netns. Read-only; `jobcage reap` decides what to remove.
    """
    known_netns: set[str] = set()
    known_veths: set[str] = set()
    known_hashes: set[str] = set()
    known_jobs: set[str] = set()
    records, bad = StateStore(config.state_dir).scan()
    # A bad record's job id (from its file name) is known too until reap sets it aside.
    job_ids = [r.job_id for r in records] + [b.job_id for b in bad if b.job_id]
    for job_id in job_ids:
        if isinstance(job_id, str):
            known_jobs.add(job_id)
            # A record claimed before the network part was built still owns the names.
            known_netns.add(make_netns_name(job_id))
            host_veth = veth_names(job_id)[0]
            known_veths.add(host_veth)
            known_hashes.add(cage_hash(host_veth))
    try:
        pool = AddressPool(config.address_pool)
        held = LeaseStore(config.state_dir, pool).held()
    except JobCageError:
        held = {}
    # /run/netns is the machine's: a netns is this state dir's only while one of its
    # leases names the job (a lease is taken before the netns is made and released only
    # after it is gone), so a second JobCage (another state dir, a test run) is never
    # reaped from here.
    # The node's links and rules are shared by every state dir too, and the same holds
    # for them: a cage's veth and chains (or counters) are made after its lease is
    # taken and removed before it is released.
    leased_netns = {make_netns_name(job): job for job in held.values()}
    leased_veths = {veth_names(job)[0] for job in held.values()}
    leased_hashes = {cage_hash(veth) for veth in leased_veths}
    orphans = [
        Orphan("netns", n, cage=cage_hash(veth_names(leased_netns[n])[0]))
        for n in netns.cage_netns_names()
        if n not in known_netns and n in leased_netns
    ]
    orphans += [
        Orphan("veth", n, cage=cage_hash(n))
        for n in netns.cage_veths()
        if n not in known_veths and n in leased_veths
    ]
    for firewall in all_firewalls():
        # A cage's rules or counters are this state dir's while it holds the lease.
        orphans += [
            Orphan("chain" if o.kind == CAGE else o.kind, o.name, o.table, cage=o.cage)
            for o in firewall.orphans(known_hashes)
            if o.kind != CAGE or o.cage in leased_hashes
        ]
    orphans += ipv6_mod.proxy_orphans(config, held, known_jobs, Orphan)
    orphans += [
        Orphan("lease", str(i), cage=cage_hash(veth_names(job)[0]))
        for i, job in sorted(held.items())
        if job not in known_jobs
    ]
    if ipv6_mod.settings_left(config.state_dir):
        # IPv6 sysctls whose last cage is gone (its owner killed before it put them back).
        orphans.append(Orphan("sysctls", ipv6_mod.SAVED_NAME))
    return orphans


def remove_orphan(orphan: Orphan, config: Config) -> None:
    """Remove one object :func:`find_orphans` listed. The caller (reap) makes sure no
    live cage claims it; each kind is removed idempotently."""
    if orphan.kind == "netns":
        netns.remove(orphan.name)
        resolv.remove_resolv_conf(orphan.name)
    elif orphan.kind == "veth":
        if not netns.is_cage_veth(orphan.name):
            raise NetworkError(f"{orphan.name} is not a JobCage veth; not removing it")
        netns.delete_link(orphan.name)
    elif orphan.kind in ("chain", "campus", "shared"):
        kind = CAGE if orphan.kind == "chain" else orphan.kind
        found = FirewallObject(kind, orphan.name, orphan.table or "", orphan.cage)
        firewall = firewall_for_table(orphan.table)
        if firewall.remove_orphan(found) and firewall.version == 6:
            # The node's last IPv6 cage was a dead owner's: its sysctls go back too.
            with ipv6_mod.locked(config.state_dir):
                ipv6_mod.restore(config.state_dir)
    elif orphan.kind == "proxy":
        ipv6_mod.remove_proxy_orphan(orphan.table or "", orphan.name)
    elif orphan.kind == "sysctls":
        ipv6_mod.restore_if_unused(config.state_dir)
    elif orphan.kind == "lease":
        store = LeaseStore(config.state_dir, AddressPool(config.address_pool))
        job_id = store.held().get(int(orphan.name))
        if job_id is not None:
            name = make_netns_name(job_id)
            # An empty or damaged lease names no netns JobCage could have made.
            if is_job_id(job_id) and os.path.exists(os.path.join(netns.NETNS_RUN_DIR, name)):
                # The lease is what makes that netns this state dir's orphan: released
                # while the netns is still there, nobody would ever reap the netns.
                raise NetworkError(
                    f"lease {orphan.name} kept: the netns {name} of job {job_id} is still "
                    f"there; remove it (ip netns del {name}), then run `jobcage reap` again"
                )
            store.release(int(orphan.name), job_id)
    else:
        raise NetworkError(f"unknown kind of orphan {orphan.kind!r}")
