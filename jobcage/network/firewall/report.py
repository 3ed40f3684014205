"""`jobcage doctor`'s view of the node's packet filters: which flavour the node's own
`iptables` is, where JobCage's rules go, whether that backend can work here, and what
on the node would interfere with them. Only reads (`iptables-*-save`)."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from . import NFTABLES, open_firewall, resolve_firewall


@dataclass(frozen=True)
class FirewallReport:
    """For `jobcage doctor`: where the node's rules live and what to worry about."""

    node_iptables: str  # "nf_tables", "legacy" or "missing"
    jobcage_backend: str
    legacy_rules: int | None
    nft_rules: int | None
    warnings: list[str] = field(default_factory=list)
    # Why JobCage's backend cannot work on this node (None: it can).
    problem: str | None = None
    # The command that shows JobCage's rules alone (None: no such command).
    shown_by: str | None = None


@functools.cache
def node_iptables_backend() -> str:
    """Which flavour the node's `iptables` command is: its --version says so."""
    exe = shutil.which("iptables")
    if exe is None:
        return "missing"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "missing"
    match = re.search(r"\((nf_tables|legacy)\)", out.stdout)
    return match.group(1) if match else "legacy"


def _save(command: str) -> str | None:
    exe = shutil.which(command)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _count_rules(saved: str | None) -> int | None:
    if saved is None:
        return None
    return sum(1 for line in saved.splitlines() if line.startswith("-A "))


def _forward_drops(saved: str | None) -> bool:
    """Whether a saved ruleset's filter FORWARD policy is DROP (Docker sets it)."""
    return saved is not None and any(
        line.startswith(":FORWARD DROP") for line in saved.splitlines()
    )


def firewall_report(backend: str = "auto") -> FirewallReport:
    """Detect the node's iptables flavour, where JobCage's rules go (``backend``, the
    config's ``firewall``) and what on the node would interfere with them."""
    node = node_iptables_backend()
    ours = resolve_firewall(backend)
    firewall = open_firewall(ours)
    problem = firewall.problem()
    legacy_saved = _save("iptables-legacy-save")
    nft_saved = _save("iptables-nft-save")
    legacy, nft = _count_rules(legacy_saved), _count_rules(nft_saved)
    warnings = []
    if node == "missing":
        warnings.append(
            "no `iptables` command: install the iptables package (python-iptables needs "
            "its libiptc and extensions)"
        )
    if ours == NFTABLES:
        drops = [
            flavour
            for flavour, saved in (("legacy", legacy_saved), ("nf_tables", nft_saved))
            if _forward_drops(saved)
        ]
        if drops:
            warnings.append(
                f"the node's {' and '.join(drops)} iptables FORWARD policy is DROP, and "
                "JobCage's accepts (table ip jobcage) do not override another table's "
                "drop: the cages get no traffic out. Add `iptables -I FORWARD -i jc+ -j "
                "ACCEPT` and `iptables -I FORWARD -o jc+ -j ACCEPT` to the node's rules "
                '(with that flavour\'s iptables), or set firewall = "iptables-legacy"'
            )
    elif node == "nf_tables":
        warnings.append(
            "the node's `iptables` is the nf_tables flavour but JobCage's rules are legacy "
            "x_tables: see them with `iptables-legacy-save`, not `iptables -L`; a packet "
            "must pass both, so an nf_tables FORWARD policy of DROP also needs an accept "
            "for the cages' pool"
        )
    if legacy and nft:
        warnings.append(
            f"rules live in both backends ({legacy} legacy, {nft} nf_tables): both are "
            "evaluated for every packet; keep the node's own rules in one of them"
        )
    return FirewallReport(node, ours, legacy, nft, warnings, problem, firewall.shown_by)
