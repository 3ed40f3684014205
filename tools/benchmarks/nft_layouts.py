"""Which nftables layout keeps one cage's commit flat in N: the experiment that chose
JobCage's layout (C), not part of tools/bench (docs/performance.md).

For each layout and N, in a private network namespace of its own (`unshare -n`), it
loads a table `ip jct` holding N cages, then adds and deletes one more cage 15 times
with `nft -f`, and reports the median time the kernel spent in the batch's send
(`strace -T`): the commit with its validation, without libnftables' own costs.

* A: the first layout, cut to one chain (FTX): a chain per cage, reached through an
  ifname -> jump verdict map. A jump element makes the kernel validate the whole table.
* B: no per-cage chain: shared rules over per-cage set and map elements (anti-spoof
  `ifname . address`, objref maps `ifname -> counter`), campus networks in a
  concatenated interval set `ifname . network` (a pipapo set).
* C: as B, but the campus networks in one shared interval set and the cages using them
  in a plain set: what jobcage/network/firewall/nftables_layout.py does now.

Run as root (needs nft and strace):

    .venv/bin/python -m tools.benchmarks.nft_layouts [N ...]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

POOL = "100.64.0.0/16"
CAMPUS = "192.0.2.0/24"
ROUNDS = 15
STRACE = ("strace", "-qq", "-f", "-T", "-e", "trace=sendmsg,sendto")
SELF = ("unshare", "-n", sys.executable, "-m", "tools.benchmarks.nft_layouts")


def _names(i: int) -> tuple[str, str, str]:
    h = f"{i:012x}"
    return h, f"jc{h}h", f"100.64.{i // 64}.{(i % 64) * 4 + 2}"


def _table(layout: str) -> str:
    if layout == "A":
        return """table ip jct {
  map mftx { type ifname : verdict; }
  chain jfwd { type filter hook forward priority 0; policy accept;
    iifname vmap @mftx; iifname "jc*" drop; }
}"""
    if layout == "B":
        campus_set = "set campus { type ifname . ipv4_addr; flags interval; }"
        campus_match = "iifname . ip daddr @campus"
    else:
        campus_set = (
            "set campuscages { type ifname; }\n"
            f"  set campusnets {{ type ipv4_addr; flags interval; elements = {{ {CAMPUS} }} }}"
        )
        campus_match = "iifname @campuscages ip daddr @campusnets"
    return f"""table ip jct {{
  set cages {{ type ifname; }}
  set addr {{ type ifname . ipv4_addr; }}
  {campus_set}
  map lantx {{ type ifname : counter; }}
  map wantx {{ type ifname : counter; }}
  chain jftx {{
    iifname . ip saddr != @addr counter drop
    ip daddr {POOL} counter reject with icmp type admin-prohibited
    {campus_match} counter name iifname map @lantx accept
    counter name iifname map @wantx accept
  }}
  chain jfwd {{ type filter hook forward priority 0; policy accept;
    iifname @cages jump jftx; iifname "jc*" drop; }}
}}"""


def _cage(layout: str, i: int, add: bool) -> str:
    h, ifname, addr = _names(i)
    counters = [f"JC-{h}-LAN-TX", f"JC-{h}-WAN-TX"]
    if layout == "A":
        if add:
            return "\n".join(
                [f"add counter ip jct {c}" for c in counters]
                + [
                    f"add chain ip jct JC-{h}-FTX",
                    f"add rule ip jct JC-{h}-FTX ip saddr != {addr} counter drop",
                    f"add rule ip jct JC-{h}-FTX ip daddr {POOL} counter reject with icmp "
                    "type admin-prohibited",
                    f"add rule ip jct JC-{h}-FTX ip daddr {CAMPUS} counter name {counters[0]} "
                    "accept",
                    f"add rule ip jct JC-{h}-FTX counter name {counters[1]} accept",
                    f'add element ip jct mftx {{ "{ifname}" : jump JC-{h}-FTX }}',
                ]
            )
        return "\n".join(
            [
                f'delete element ip jct mftx {{ "{ifname}" }}',
                f"flush chain ip jct JC-{h}-FTX",
                f"delete chain ip jct JC-{h}-FTX",
            ]
            + [f"delete counter ip jct {c}" for c in counters]
        )
    campus = (
        [("campus", f'"{ifname}" . {CAMPUS}')]
        if layout == "B"
        else [("campuscages", f'"{ifname}"')]
    )
    elements = [("cages", f'"{ifname}"'), ("addr", f'"{ifname}" . {addr}'), *campus]
    maps = [("lantx", counters[0]), ("wantx", counters[1])]
    if add:
        return "\n".join(
            [f"add counter ip jct {c}" for c in counters]
            + [f"add element ip jct {s} {{ {e} }}" for s, e in elements]
            + [f'add element ip jct {m} {{ "{ifname}" : "{c}" }}' for m, c in maps]
        )
    return "\n".join(
        [f"delete element ip jct {s} {{ {e} }}" for s, e in elements]
        + [f'delete element ip jct {m} {{ "{ifname}" }}' for m, _ in maps]
        + [f"delete counter ip jct {c}" for c in counters]
    )


def _kernel_ms(nft_file: str, trace: str) -> float:
    """The longest send of `nft -f`: the batch, committed inside the syscall."""
    subprocess.run(
        [*STRACE, "-o", trace, "nft", "-f", nft_file],
        check=True,
    )
    with open(trace) as f:
        return max(float(t) for t in re.findall(r"<([0-9.]+)>", f.read())) * 1000


def one(layout: str, n: int) -> dict:
    """Runs in the private netns that main() started it in."""
    with tempfile.TemporaryDirectory(prefix="jc-nftlayout-") as d:
        base = os.path.join(d, "base.nft")
        with open(base, "w") as f:
            f.write(_table(layout) + "\n")
            f.writelines(_cage(layout, i, True) + "\n" for i in range(n))
        subprocess.run(["nft", "-f", base], check=True)
        paths = {}
        for op in ("add", "del"):
            paths[op] = os.path.join(d, f"{op}.nft")
            with open(paths[op], "w") as f:
                f.write(_cage(layout, n + 1, op == "add") + "\n")
        trace = os.path.join(d, "trace")
        adds, dels = [], []
        for _ in range(ROUNDS):
            adds.append(_kernel_ms(paths["add"], trace))
            dels.append(_kernel_ms(paths["del"], trace))
    return {
        "layout": layout,
        "n": n,
        "add_ms": round(statistics.median(adds), 3),
        "delete_ms": round(statistics.median(dels), 3),
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(json.dumps(one(argv[1], int(argv[2]))))
        return
    sizes = [int(a) for a in argv] or [0, 500, 1000]
    for layout in ("A", "B", "C"):
        for n in sizes:
            # A network namespace of its own per run: nothing touches the node's rules.
            subprocess.run(
                [*SELF, "--one", layout, str(n)],
                check=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
