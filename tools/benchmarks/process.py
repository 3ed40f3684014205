"""Whole-process rows: what a batch system pays per job for `jobcage run`.

A batch system starts ``jobcage run`` once per job, so the interpreter's start and
imports are part of every job's cost, not only the library's cycle. Each row runs the
command as a new process, interleaved (common.measure_interleaved) with a shell recipe
doing the same kernel steps without JobCage:

* cgroup: ``jobcage run --job-id X -- true`` against a shell script that makes the
  cage's cgroups (one per v1 controller JobCage joins, or one v2 directory), joins
  them, runs ``true``, freezes and thaws, and removes them; and, as the floor any
  CPython entry point starts from, a bare interpreter importing only the standard
  library modules that ``jobcage run`` imports, against the same recipe;
* network (in the simulated node), once per firewall backend of JobCage:
  ``jobcage run --network -- true`` against the bare recipe: netns, a veth made in
  it, addresses, route, MASQUERADE and four FORWARD counting rules with
  iptables-legacy, run, delete.

    .venv/bin/python -m tools.benchmarks.process [--runs N] [--no-network]
"""

from __future__ import annotations

import argparse
import compileall
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jobcage
from jobcage.cgroups import probe

from . import common

JOBCAGE = os.path.join(os.path.dirname(sys.executable), "jobcage")
CONTROLLERS = ("freezer", "memory", "cpuacct", "blkio")

CGROUP_RECIPE = """\
set -e
for d in $DIRS; do mkdir "$d"; done
sh -c 'for d in $DIRS; do echo $$ > "$d/cgroup.procs"; done; exec true'
echo FROZEN > "$FREEZER/freezer.state"
echo THAWED > "$FREEZER/freezer.state"
for d in $DIRS; do rmdir "$d"; done
"""

NET_RECIPE = """\
set -e
ip netns add "$NS"
ip -n "$NS" link add eth0 type veth peer name "$VETH" netns "$NODE_NS"
ip -n "$NS" addr add 100.64.255.2/30 dev eth0
ip -n "$NS" link set eth0 up
ip -n "$NS" link set lo up
ip addr add 100.64.255.1/30 dev "$VETH"
ip link set "$VETH" up
ip -n "$NS" route add default via 100.64.255.1
iptables-legacy -w -t nat -A POSTROUTING -s 100.64.255.2/32 -j MASQUERADE
iptables-legacy -w -A FORWARD -i "$VETH" -d 192.0.2.0/24
iptables-legacy -w -A FORWARD -i "$VETH" ! -d 192.0.2.0/24
iptables-legacy -w -A FORWARD -o "$VETH" -s 192.0.2.0/24
iptables-legacy -w -A FORWARD -o "$VETH" ! -s 192.0.2.0/24
ip netns exec "$NS" true
iptables-legacy -w -D FORWARD -o "$VETH" ! -s 192.0.2.0/24
iptables-legacy -w -D FORWARD -o "$VETH" -s 192.0.2.0/24
iptables-legacy -w -D FORWARD -i "$VETH" ! -d 192.0.2.0/24
iptables-legacy -w -D FORWARD -i "$VETH" -d 192.0.2.0/24
iptables-legacy -w -t nat -D POSTROUTING -s 100.64.255.2/32 -j MASQUERADE
ip netns del "$NS"
"""


def _config_file(directory: str, parent: str, **extra: str) -> str:
    path = os.path.join(directory, "jobcage.toml")
    with open(path, "w") as f:
        f.write(f'state_dir = "{directory}/state"\ncgroup_parent = "{parent}"\n')
        for key, value in extra.items():
            f.write(f"{key} = {value}\n")
    return path


def cgroup_rows(runs: int) -> dict:
    h = probe()
    tag = f"jobcage-bench-proc-{os.urandom(3).hex()}"
    parent = f"/{tag}"
    counter = itertools.count()
    with tempfile.TemporaryDirectory(prefix="jobcage-bench-") as directory:
        env = {**os.environ, "JOBCAGE_CONFIG": _config_file(directory, parent)}
        # The recipe's own parent: JobCage removes its parent when its last cage goes.
        if h.default_version == 2:
            assert h.v2_mount is not None
            parents = [os.path.join(h.v2_mount, f"{tag}-sh")]
        else:
            mounts = [h.v1_mounts[c] for c in CONTROLLERS if c in h.v1_mounts]
            parents = [os.path.join(m, f"{tag}-sh") for m in mounts]
        for p in parents:
            os.makedirs(p, exist_ok=True)

        def jobcage() -> None:
            subprocess.run(
                [JOBCAGE, "run", "--job-id", f"p{next(counter)}", "--", "true"],
                env=env,
                check=True,
            )

        def recipe() -> None:
            name = f"r{next(counter)}"
            dirs = [os.path.join(p, name) for p in parents]
            freezer = next((d for d in dirs if "/freezer/" in d), dirs[0])
            subprocess.run(
                ["sh", "-c", CGROUP_RECIPE],
                env={**os.environ, "DIRS": " ".join(dirs), "FREEZER": freezer},
                check=True,
            )

        floor = _floor(env, [], "stdlib")
        try:
            rows = _rows(
                {"jobcage run -- true": jobcage, "shell cgroup recipe": recipe}, runs, 2.0
            )
            rows["floor"] = _rows({"python + run's stdlib": floor, "recipe": recipe}, runs, None)
            return rows
        finally:
            for p in parents:
                os.rmdir(p)


STDLIB_OF_RUN = """\
import atexit, sys

OUT = sys.argv[1]

def dump():
    with open(OUT, "w") as f:
        f.write(" ".join(sorted({m.split(".")[0] for m in sys.modules} & sys.stdlib_module_names)))

atexit.register(dump)
from jobcage.cli import main
sys.argv = ["jobcage", *sys.argv[2:]]
sys.exit(main())
"""


FLOOR_ROW = "floor: bare python importing the stdlib modules `jobcage run` does, vs the recipe"


def _floor(env: dict, prefix: list[str], job_id: str, *options: str) -> Callable[[], None]:
    """A fresh interpreter importing only the standard library's top-level modules that a
    `jobcage run [options] -- true` (run under ``prefix``) has imported by its exit: the
    floor of any CPython `jobcage run`, before one line of JobCage or one kernel call."""
    with tempfile.NamedTemporaryFile("r", prefix="jobcage-bench-") as out:
        command = [*prefix, sys.executable, "-c", STDLIB_OF_RUN, out.name, "run"]
        job = ["--job-id", job_id, *options, "--", "true"]
        subprocess.run([*command, *job], env=env, check=True)
        floor_command = [sys.executable, "-c", "import " + ", ".join(out.read().split())]

    def floor() -> None:
        subprocess.run(floor_command, check=True)

    return floor


def _rows(fns: dict, runs: int, target: float | None) -> dict:
    """Each pair measured in both states of a node (common.warm_cgroup_lock, common.idle):
    the first cgroup migration after a pause waits for an RCU grace period, and a
    `jobcage run` migrates its job only after its imports, by when a busy node's
    warm state has passed; the shell's comes at once. Only the quiet node puts the
    same wait in both."""
    (mine, recipe), out = fns, {}
    for state, before in (("busy", common.warm_cgroup_lock), ("quiet", common.idle)):
        figures = common.measure_interleaved(fns, runs, before=before)
        a, b = figures[mine], figures[recipe]
        out[state] = {
            mine: a.as_dict(),
            recipe: b.as_dict(),
            "ratio": round(common.ratio(a, b), 2),
        }
    out["target"] = target
    return out


def network_rows(runs: int, firewall: str) -> dict:
    from . import world

    with world.node(firewall) as node, tempfile.TemporaryDirectory() as directory:
        counter = itertools.count()
        conf = _config_file(
            directory,
            node.config.cgroup_parent or "/jobcage-bench",
            address_pool=f'"{node.config.address_pool}"',
            campus_networks=f'["{node.config.campus_networks[0]}"]',
            firewall=f'"{firewall}"',
        )
        netns = node.world.netns_path(node.world.node)
        env = {**os.environ, "JOBCAGE_CONFIG": conf}

        def jobcage() -> None:
            job = node.job_id(f"p{next(counter)}")
            subprocess.run(
                [
                    "nsenter",
                    f"--net={netns}",
                    "--",
                    JOBCAGE,
                    "run",
                    "--job-id",
                    job,
                    "--network",
                    "--",
                    "true",
                ],
                env=env,
                check=True,
            )

        def recipe() -> None:
            n = next(counter)
            subprocess.run(
                ["nsenter", f"--net={netns}", "--", "sh", "-c", NET_RECIPE],
                env={
                    **os.environ,
                    "NS": f"{node.tag}r{n}",
                    "VETH": f"jcr{node.tag[-6:]}{n % 100}",
                    "NODE_NS": netns,
                },
                check=True,
            )

        nsenter = ["nsenter", f"--net={netns}", "--"]
        floor = _floor(env, nsenter, node.job_id("stdlib"), "--network")
        rows = _rows(
            {"jobcage run --network -- true": jobcage, "bare networked recipe": recipe},
            runs,
            1.25,
        )
        rows["floor"] = _rows({"python + run's stdlib": floor, "recipe": recipe}, runs, None)
        return rows


def run(runs: int, network: bool = True) -> dict:
    # What a node's regular install has: pip compiles the package's bytecode when it
    # installs it. Without it (an editable checkout under PYTHONDONTWRITEBYTECODE, as
    # here), every `jobcage run` would compile the modules it imports again.
    compileall.compile_dir(os.path.dirname(jobcage.__file__), quiet=1)
    result = {"cgroup": cgroup_rows(runs)}
    if network:
        for firewall in ("nftables", "iptables-legacy"):
            result[f"network {firewall}"] = network_rows(runs, firewall)
    return result


def markdown(result: dict) -> list[str]:
    lines = [
        "### Whole process: `jobcage run` against shell recipes (fresh processes), ms",
        "",
        "| row | node | JobCage | recipe | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for row, figures in result.items():
        _markdown_rows(lines, row, figures)
        if "floor" in figures:
            _markdown_rows(lines, FLOOR_ROW, figures["floor"])
    return [*lines, ""]


def _markdown_rows(lines: list[str], row: str, figures: dict) -> None:
    target = "-" if figures["target"] is None else f"{figures['target']}x"
    for state in ("busy", "quiet"):
        mine, recipe = (v for v in figures[state].values() if isinstance(v, dict))
        lines.append(
            f"| {row} | {state} | {mine['median_ms']} | {recipe['median_ms']} | "
            f"{figures[state]['ratio']}x | {target} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.benchmarks.process", description=__doc__
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-network", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.runs, network=not args.no_network), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
