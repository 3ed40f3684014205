"""The network sections of tools/bench, once per firewall backend, each in a simulated
world of its own, built and removed here: networked lifecycle (netlife), scale (N
others), datapath and accuracy."""

from __future__ import annotations

import contextlib

from jobcage import JobCage

from . import datapath, netlife, scale, world

FIREWALLS = ("nftables", "iptables-legacy")


def run(quick: bool, firewalls: tuple[str, ...] = FIREWALLS) -> dict:
    """firewall -> that backend's figures."""
    return {firewall: run_one(quick, firewall) for firewall in firewalls}


def run_one(quick: bool, firewall: str) -> dict:
    sizes = [0, 20] if quick else [0, 100, 500, 1000]
    crowded = sizes[-1] if quick else 500
    seconds, reps, requests = (1, 1, 200) if quick else (3, 8, 3000)
    out: dict = {}
    with world.node(firewall) as node, contextlib.ExitStack() as stack:
        datapath.start_http(node)
        out["lifecycle"] = netlife.run(node, runs=3 if quick else 30)
        probe = JobCage(node.job_id("dp"), network=True, config=node.config)
        probe.create()
        try:
            cage_path = probe._net.netns_path  # type: ignore[union-attr]
            plain = stack.enter_context(datapath.plain_path(node))
            paths = {"cage": cage_path, "plain": plain}
            out["accuracy"] = datapath.accuracy(
                cage_path,
                probe._net.counters,  # type: ignore[union-attr]
                seconds,
                (16 if quick else 256) << 20,
            )
            out["datapath"] = {"0": datapath.throughput(node, paths, seconds, reps, requests)}

            def at_size(n: int, crowd: scale.Crowd) -> None:
                if n == crowded:
                    out["datapath"][str(n)] = datapath.throughput(
                        node, paths, seconds, reps, requests
                    )

            # The datapath probe is made before the crowd: with x_tables its jumps are
            # the last of the shared chains, so its packets walk every other cage's
            # jump first (with nftables a map lookup finds it, wherever it is).
            out["scale"] = scale.run(node, sizes, runs=5 if quick else 20, at_size=at_size)
        finally:
            probe.destroy()
    return out
