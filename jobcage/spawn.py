"""Starting a process that is inside the cage before it executes a single instruction
of the job.

The child joins every cgroup (writing "0", i.e. itself, into each ``cgroup.procs``)
and the network namespace in ``preexec_fn``, between fork and exec: there is no
window in which the job could fork outside the cage. Every file is opened in the
parent, so the child only calls write(2) and setns(2). Privileges are dropped last,
in the child too, because joining cgroups and namespaces needs root: CPython's own
``user=``/``group=`` arguments drop them *before* ``preexec_fn`` runs.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SpawnError
from .syscalls import CLONE_NEWNET, CLONE_NEWNS, MS_BIND, MS_REC, MS_SLAVE
from .syscalls import check as _check
from .syscalls import libc as _libc

# Popen options that would break the cage, and what to use instead. The cage is
# entered in preexec_fn; CPython's group/extra_groups (like its user=, which spawn's
# own ``user`` replaces) drop privileges *before* preexec_fn runs, after which the
# child can no longer join its cgroups or netns.
REFUSED_OPTIONS = {
    "preexec_fn": "the cage is entered in preexec_fn between fork and exec, so a second "
    "one cannot run; do that work in the job (a wrapper script) instead",
    "group": "use spawn(user=...), which takes the user's groups from the passwd "
    "database: CPython's group= drops root before the cage is entered",
    "extra_groups": "use spawn(user=...), which sets the user's supplementary groups: "
    "CPython's extra_groups= drops root before the cage is entered",
}


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None


def resolve_user(user: str | int) -> Credentials:
    """Look the user up in the parent, so a bad name fails before any fork."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if isinstance(user, int) and user >= 0:
            # A uid without a passwd entry (batch systems map users that way too):
            # its own gid, no supplementary groups.
            return Credentials(user, user, (), None)
        raise SpawnError(
            f"no such user {user!r} on this node: check the passwd database "
            "(getent passwd) or give a uid"
        ) from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Credentials(entry.pw_uid, entry.pw_gid, groups, entry.pw_name)


def spawn(
    argv: Sequence[str],
    *,
    join_files: Sequence[str],
    netns_path: str | None = None,
    resolv_conf: str | None = None,
    user: str | int | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    **popen_options: Any,
) -> subprocess.Popen:
    """``popen_options`` go to Popen (text, encoding, pass_fds, bufsize…) except
    those in REFUSED_OPTIONS. The job leads its own session unless the caller says
    ``start_new_session=False`` (or gives a ``process_group``)."""
    refused = sorted(set(popen_options) & REFUSED_OPTIONS.keys())
    if refused:
        raise SpawnError(
            f"spawn() cannot take {refused[0]}=: {REFUSED_OPTIONS[refused[0]]}; "
            "nothing was started"
        )
    if "process_group" not in popen_options:
        popen_options.setdefault("start_new_session", True)
    if not argv:
        raise SpawnError("nothing to run: argv is empty")
    creds = resolve_user(user) if user is not None else None
    fds: list[int] = []
    try:
        for path in join_files:
            fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        join_fds = tuple(fds)
        netns_fd = -1
        if netns_path is not None:
            netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(netns_fd)
        resolv = resolv_conf.encode() if resolv_conf else None

        def enter_cage() -> None:
            for fd in join_fds:
                os.write(fd, b"0")
            if netns_fd >= 0:
                _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns")
            if resolv is not None:
                # What `ip netns exec` does for /etc/netns/NAME/resolv.conf: a private
                # mount namespace (slave, so host mounts still propagate in) with the
                # cage's resolv.conf bound over the node's.
                _check(_libc.unshare(CLONE_NEWNS), "unshare")
                _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount")
                _check(
                    _libc.mount(resolv, b"/etc/resolv.conf", None, MS_BIND, None),
                    "bind resolv.conf",
                )
            if creds is not None:
                os.setgroups(creds.groups)
                os.setgid(creds.gid)
                os.setuid(creds.uid)

        try:
            return subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=enter_cage,
                **popen_options,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            if cwd is not None and e.filename == cwd:
                # CPython reports a failed chdir(cwd) in the child with cwd as the
                # filename: the directory is at fault, not the command.
                who = f" as user {creds.name or creds.uid}" if creds else ""
                raise SpawnError(
                    f"cannot enter the working directory {cwd!r}{who}: {e.strerror} "
                    "(check that it exists and that the job's user may enter it)"
                ) from e
            if isinstance(e, NotADirectoryError):
                raise
            raise _exec_error(e, argv[0], creds) from e
        except subprocess.SubprocessError as e:
            raise SpawnError(
                f"the job could not enter its cage before exec ({e}); the cage's "
                "cgroup or netns may have been removed: check `jobcage list`"
            ) from e
    finally:
        for fd in fds:
            os.close(fd)


def _exec_error(e: OSError, program: str, creds: Credentials | None) -> SpawnError:
    """ENOENT and EACCES from exec, with the errno the CLI maps to 127 and 126."""
    if isinstance(e, FileNotFoundError):
        return SpawnError(
            e.errno,
            f"cannot run {program!r}: no such file (check the path and the job's PATH)",
        )
    who = f" as user {creds.name or creds.uid}" if creds else ""
    return SpawnError(
        e.errno,
        f"cannot run {program!r}{who}: permission denied "
        "(check the file's mode and every directory above it)",
    )
