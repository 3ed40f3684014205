"""Networked lifecycle: JobCage(network=True) create -> spawn `true` -> wait -> destroy,
inside the simulated node, against the floor and the recipe measured in the same run,
interleaved (common.measure_interleaved) so that load from elsewhere on the shared
machine falls on every variant alike.

* floor (tools/benchmarks/floor.py): the same cgroups, netns, veth, addresses, route,
  rules and NAT with the fewest calls from Python, in the node's config's firewall
  backend (one iptables-legacy-restore, or one prebuilt nftables transaction);
* recipe: the manual steps scripted for a shell, as an administrator would: `ip netns
  add`, `ip link`/`ip addr`/`ip route`, one `iptables-legacy -w` per rule, cgroupfs
  writes, the job started by `ip netns exec`.

Also network-only variants (NetworkCage alone vs the floor's links and rules) that
split the cost between cgroups and network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import uuid
from collections.abc import Callable

from jobcage import JobCage
from jobcage.cgroups import probe
from jobcage.cgroups.base import write_file
from jobcage.network import NetworkCage
from jobcage.network.firewall.policy import NAT_CHAIN, SharedPlan, cage_plan

from . import floor
from .common import after_idle, idle, measure_interleaved, ratio
from .floor import NftFloor
from .world import Node, networld

CONTROLLERS = ("freezer", "memory", "cpuacct", "blkio", "pids")
FLOOR_HOST = ipaddress.IPv4Interface("100.64.255.253/30")
FLOOR_JOB = ipaddress.IPv4Interface("100.64.255.254/30")
RECIPE_HOST = ipaddress.IPv4Interface("100.64.255.249/30")
RECIPE_JOB = ipaddress.IPv4Interface("100.64.255.250/30")


def _plan(veth: str, job: ipaddress.IPv4Interface):
    return cage_plan(
        cage_hash=uuid.uuid4().hex[:12],
        host_veth=veth,
        address=job.ip,
        pool=networld.POOL,
        campus_networks=(ipaddress.IPv4Network(networld.CAMPUS_NETWORK),),
        allow_node_access=False,
    )


def run(node: Node, runs: int) -> dict:
    config = node.config
    h = probe()
    mounts = {c: h.v1_mounts[c] for c in CONTROLLERS if c in h.v1_mounts}
    parent = f"{config.cgroup_parent}-floor"
    counter = iter(range(10**9))
    shared = SharedPlan(networld.POOL, "eth0")
    nft = NftFloor() if config.firewall == "nftables" else None

    def veth() -> str:
        # A fresh name each cycle, in the cages' pattern: the kernel deletes the last
        # cycle's veth (and its route) asynchronously, after the netns is unmounted.
        return f"jc{uuid.uuid4().hex[:12]}h"

    def jobcage_cycle() -> None:
        job = node.job_id(f"n{next(counter)}")
        with JobCage(job, memory_limit="1G", pids_limit=1000, network=True, config=config) as c:
            c.spawn(["true"]).wait()

    def network_only_cycle() -> None:
        NetworkCage.create(node.job_id(f"o{next(counter)}"), config).destroy()

    def floor_network(path: str) -> Callable[[], None]:
        """Build the floor's links and rules; return what removes the rules."""
        name = veth()
        plan = _plan(name, FLOOR_JOB)
        if nft is not None:
            add, remove = nft.batches(plan, shared)  # before the clock
            floor.build_links(path, name, FLOOR_HOST, FLOOR_JOB)
            nft.send(add)
            return lambda: nft.send(remove)
        floor.build_links(path, name, FLOOR_HOST, FLOOR_JOB)
        floor.restore(floor.restore_input(plan, shared, add=True))
        removal = floor.restore_input(plan, shared, add=False)
        return lambda: floor.restore(removal)

    def floor_network_cycle() -> None:
        path = f"/run/netns/{node.tag}fo{next(counter)}"
        remove_rules = floor_network(path)
        remove_rules()
        floor.remove_netns(path)

    def floor_cycle() -> None:
        i = next(counter)
        path = f"/run/netns/{node.tag}fl{i}"
        dirs = []
        for m in mounts.values():
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(m, parent.lstrip("/")))
            d = os.path.join(m, parent.lstrip("/"), f"f{i}")
            os.mkdir(d)
            dirs.append(d)
        where = dict(zip(mounts, dirs, strict=True))
        write_file(os.path.join(where["memory"], "memory.limit_in_bytes"), "1073741824")
        write_file(os.path.join(where["pids"], "pids.max"), "1000")
        remove_rules = floor_network(path)
        fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY) for d in dirs]
        ns = os.open(path, os.O_RDONLY)

        def join() -> None:
            for fd in fds:
                os.write(fd, b"0")
            floor.setns(ns)

        subprocess.Popen(["true"], preexec_fn=join).wait()
        for fd in [*fds, ns]:
            os.close(fd)
        write_file(os.path.join(where["freezer"], "freezer.state"), "FROZEN")
        write_file(os.path.join(where["freezer"], "freezer.state"), "THAWED")
        remove_rules()
        floor.remove_netns(path)
        for d in dirs:
            os.rmdir(d)

    recipe = _recipe_script(mounts, parent)

    def recipe_cycle() -> None:
        name = f"{node.tag}rc{next(counter)}"
        subprocess.run(
            ["bash", "-c", recipe, "bash", name, veth()], check=True, capture_output=True
        )

    try:
        figures = measure_interleaved(
            {
                "jobcage": jobcage_cycle,
                "floor": floor_cycle,
                "recipe": recipe_cycle,
                "network_only_jobcage": network_only_cycle,
                "network_only_floor": floor_network_cycle,
            },
            runs,
            warmup=1,
        )
        quiet = measure_interleaved(
            {"jobcage": jobcage_cycle, "floor": floor_cycle, "recipe": recipe_cycle},
            max(3, runs // 3),
            warmup=0,
            before=idle,
        )
    finally:
        if nft is not None:
            nft.close()
        # A failed floor or recipe cycle leaves its (empty) cgroups: remove them.
        for m in mounts.values():
            top = os.path.join(m, parent.lstrip("/"))
            for child in os.listdir(top) if os.path.isdir(top) else []:
                if os.path.isdir(os.path.join(top, child)):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(top, child))
            with contextlib.suppress(OSError):
                os.rmdir(top)
    out = {name: f.as_dict() for name, f in figures.items()}
    out["jobcage_vs_floor"] = ratio(figures["jobcage"], figures["floor"])
    out["recipe_vs_jobcage"] = ratio(figures["recipe"], figures["jobcage"])
    out["after_idle"] = after_idle(quiet)
    out["network_only_jobcage_vs_floor"] = ratio(
        figures["network_only_jobcage"], figures["network_only_floor"]
    )
    return out


def _recipe_script(mounts: dict[str, str], parent: str) -> str:
    """The 2011 recipe, one command per step. $1 is the namespace's name, $2 the
    node-side veth's."""
    veth = "$v"
    plan = _plan("VETH", RECIPE_JOB)
    shared = SharedPlan(networld.POOL, "eth0")
    ipt = "iptables-legacy -w"
    lines = ["set -e", 'n="$1"; v="$2"']
    lines += [f'mkdir "{m}{parent}/$n"' for m in mounts.values()]
    lines.append(f'echo 1073741824 > "{mounts["memory"]}{parent}/$n/memory.limit_in_bytes"')
    lines.append(f'echo 1000 > "{mounts["pids"]}{parent}/$n/pids.max"')
    lines += [
        'ip netns add "$n"',
        f'ip link add {veth} type veth peer name eth0 netns "$n"',
        'ip -n "$n" link set lo up',
        'ip -n "$n" link set eth0 up',
        f'ip -n "$n" addr add {RECIPE_JOB} dev eth0',
        f'ip -n "$n" route add default via {RECIPE_HOST.ip}',
        f"ip addr add {RECIPE_HOST} dev {veth}",
        f"ip link set {veth} up",
    ]
    for c in shared.filter_chains:
        lines += [f"{ipt} -N {c}", f"{ipt} -A {c} -j DROP"]
    for j in reversed(shared.filter_jumps):
        lines.append(f"{ipt} -I {j.chain} {j.rule.to_iptables()}")
    for chain in plan.chains:
        lines.append(f"{ipt} -N {chain.name}")
        lines += [f"{ipt} -A {chain.name} {r.to_iptables()}" for r in chain.rules]
    lines += [f"{ipt} -I {j.chain} {j.rule.to_iptables()}" for j in plan.jumps]
    lines += [
        f"{ipt} -t nat -N {NAT_CHAIN}",
        f"{ipt} -t nat -A {NAT_CHAIN} {shared.nat_chain.rules[0].to_iptables()}",
        f"{ipt} -t nat -I POSTROUTING {shared.nat_jump.rule.to_iptables()}",
    ]
    joins = "; ".join(f'echo $$ > {m}{parent}/"$0"/cgroup.procs' for m in mounts.values())
    lines.append(f'ip netns exec "$n" sh -c \'{joins}; exec true\' "$n"')
    fr = f"{mounts['freezer']}{parent}/$n/freezer.state"
    lines.append(f'echo FROZEN > "{fr}"; echo THAWED > "{fr}"')
    lines += [f"{ipt} -D {j.chain} {j.rule.to_iptables()}" for j in plan.jumps]
    lines += [f"{ipt} -F {c}; {ipt} -X {c}" for c in plan.chain_names]
    lines += [f"{ipt} -D {j.chain} {j.rule.to_iptables()}" for j in shared.filter_jumps]
    lines += [f"{ipt} -F {c}; {ipt} -X {c}" for c in shared.filter_chains]
    lines += [
        f"{ipt} -t nat -D POSTROUTING {shared.nat_jump.rule.to_iptables()}",
        f"{ipt} -t nat -F {NAT_CHAIN}; {ipt} -t nat -X {NAT_CHAIN}",
        'ip netns del "$n"',
    ]
    lines += [f'rmdir "{m}{parent}/$n"' for m in mounts.values()]
    return "\n".join(lines).replace("VETH", '"$v"')
