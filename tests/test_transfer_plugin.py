"""jobcage-transfer-plugin with real qemu-img: instances checked by `qemu-img check` and
read through with qemu-io; every refusal; HTCondor's multi-file protocol end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobcage import classads
from jobcage.transfer import plugin, qcow

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are needed: install Debian's qemu-utils (tools/setup does)",
)

IS_ROOT = os.geteuid() == 0
PLUGIN = str(Path(sys.executable).parent / "jobcage-transfer-plugin")
SIZE = "4M"
PATTERN = 0xA5


def qemu_io(fmt: str, image: Path | str, command: str, *, read_only: bool = True) -> None:
    argv = ["qemu-io", "-f", fmt, "-c", command, str(image)]
    if read_only:
        argv.insert(1, "-r")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr


def make_base(path: Path, fmt: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), SIZE], check=True)
    qemu_io(fmt, path, f"write -P {PATTERN} 0 64k", read_only=False)
    return path


def make_overlay(path: Path, backing: Path, backing_fmt: str = "raw") -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(backing), "-F", backing_fmt]
    subprocess.run([*argv, str(path), SIZE], check=True)
    return path


QCOW2_BACKING_FORMAT_EXTENSION = bytes.fromhex("e2792aca")  # qcow2 spec, header extensions


def forget_backing_format(overlay: Path) -> None:
    """Make ``overlay`` what older qemu-img wrote without -F (7.x refuses to): the
    backing format's header extension gets an unknown magic, which qemu skips."""
    with open(overlay, "r+b") as f:
        header = f.read(65536)
        at = header.index(QCOW2_BACKING_FORMAT_EXTENSION)
        f.seek(at)
        f.write(b"jobc")
    assert qcow.image_info(str(overlay)).backing_format is None


@pytest.fixture
def world(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    scratch = tmp_path / "scratch"
    shared.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(scratch))
    return shared, scratch


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(qcow.TEMP_PREFIX)]


def check_instance(instance: Path, base: Path, base_fmt: str) -> None:
    check = subprocess.run(["qemu-img", "check", str(instance)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    info = qcow.image_info(str(instance), "qcow2")
    assert (info.format, info.backing_path, info.backing_format) == (
        "qcow2",
        os.path.realpath(base),
        base_fmt,
    )
    qemu_io("qcow2", instance, f"read -P {PATTERN} 0 64k")  # the base's data, through it
    qemu_io("qcow2", instance, "read -P 0 64k 64k")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_single_file_form_makes_a_checked_instance(world, fmt):
    shared, scratch = world
    base = make_base(shared / f"base.{fmt}", fmt)
    before = base.read_bytes()
    dest = scratch / "disk.qcow2"
    assert plugin.main([f"cow://{base}", str(dest)]) == 0
    check_instance(dest, base, fmt)
    assert dest.stat().st_size < 1024 * 1024  # metadata only; the base's 4 MiB stayed shared
    qemu_io("qcow2", dest, "write -P 0x11 0 4k", read_only=False)  # the job writes
    qemu_io("qcow2", dest, "read -P 0x11 0 4k")
    assert base.read_bytes() == before  # into its instance only
    assert leftovers(scratch) == []


def test_historical_nfs_form_names_the_instance(world):
    shared, scratch = world
    base = make_base(shared / "base.img", "raw")
    dest = scratch / "base.img:vm1.qcow2"  # what HTCondor derives from the URL's tail
    assert plugin.main([f"nfs:{base}:vm1.qcow2", str(dest)]) == 0
    check_instance(scratch / "vm1.qcow2", base, "raw")
    assert not dest.exists()


def test_base_overlay_chain_with_recorded_formats_is_accepted(world):
    shared, scratch = world
    raw = make_base(shared / "root.raw", "raw")
    mid = make_overlay(shared / "mid.qcow2", raw, "raw")
    assert plugin.main([f"cow://{mid}", str(scratch / "i.qcow2")]) == 0
    check_instance(scratch / "i.qcow2", mid, "qcow2")


def run_as_root_in_private_mounts(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` (sh) in a mount namespace of its own: its mounts end with it."""
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="a read-only bind mount needs root")
def test_base_on_read_only_storage(world):
    shared, scratch = world
    base = make_base(shared / "base.qcow2", "qcow2")
    dest = scratch / "disk.qcow2"
    script = """
        mount --bind "$1" "$1"
        mount -o remount,bind,ro "$1"
        if touch "$1/probe" 2>/dev/null; then echo "storage is writable"; exit 3; fi
        _CONDOR_SCRATCH_DIR="$2" "$3" "cow://$4" "$5"
    """
    done = run_as_root_in_private_mounts(
        script, str(shared), str(scratch), PLUGIN, str(base), str(dest)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check_instance(dest, base, "qcow2")


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="a small tmpfs needs root")
def test_full_scratch_leaves_nothing_half_made(world, tmp_path):
    shared, scratch = world
    base = make_base(shared / "base.raw", "raw")
    infile, outfile = tmp_path / "in.ads", tmp_path / "out.ads"  # outside the tmpfs
    write_list(infile, [(f"cow://{base}", f"{scratch}/disk.qcow2")])
    script = """
        mount -t tmpfs -o size=96k jobcage-test "$1"
        set +e
        _CONDOR_SCRATCH_DIR="$1" "$2" -infile "$3" -outfile "$4"
        echo "rc=$?"
        ls -A "$1"
    """
    done = run_as_root_in_private_mounts(script, str(scratch), PLUGIN, str(infile), str(outfile))
    assert done.stdout.splitlines() == ["rc=1"], done.stdout + done.stderr  # and no file
    (result,) = classads.read_ads(str(outfile))
    assert "No space left on device" in classads.evaluate(result, "TransferError")
    (data,) = classads.evaluate(result, "TransferErrorData")
    assert classads.evaluate(data, "ErrorType") == "Transfer"
    assert classads.evaluate(data, "FailureType") == "NoSpace"


def refused(url: str, dest: Path | str, match: str, kind: str = "Parameter") -> None:
    result = plugin.transfer_one(url, str(dest), os.environ["_CONDOR_SCRATCH_DIR"])
    assert result["TransferSuccess"] is False
    assert match in result["TransferError"], result["TransferError"]
    (data,) = result["TransferErrorData"]  # HTCondor's structured twin of the message
    assert (data["ErrorType"], data["ErrorString"]) == (kind, result["TransferError"])


def test_refusals_each_say_why(world, tmp_path):
    shared, scratch = world
    base = make_base(shared / "base.raw", "raw")
    outside = tmp_path / "outside"
    outside.mkdir()
    (scratch / "escape").symlink_to(outside)
    (scratch / "adir").mkdir()
    forget_backing_format(make_overlay(shared / "guess.qcow2", base))
    make_overlay(shared / "orphan.qcow2", shared / "gone.raw", "raw")
    good = scratch / "disk.qcow2"
    refused("http://x/base", good, "not one this plugin answers")
    refused("cow://host/base", good, "no absolute path")
    refused(f"nfs:{base}", good, "instance file name")
    refused(f"nfs:{base}:a/b", good, "without '/'")
    refused("nfs:shared/base.raw:i.qcow2", good, "is relative")
    refused(f"cow://{shared}/../shared/base.raw", good, "'..'")
    refused(f"cow://{base}", "disk.qcow2", "is relative")
    refused(f"cow://{base}", f"{scratch}/../outside/disk.qcow2", "'..'")
    refused(f"cow://{base}", outside / "disk.qcow2", "outside the job's scratch directory")
    refused(f"cow://{base}", scratch / "escape" / "disk.qcow2", "outside the job's scratch")
    refused(f"cow://{base}", scratch / "nodir" / "disk.qcow2", "cannot be opened")
    refused(f"cow://{base}", scratch / "adir", "is a directory")
    refused(f"cow://{shared}/missing.raw", good, "No such file", "Specification")
    refused(f"cow://{shared}", good, "not a regular file", "Specification")
    refused(
        f"cow://{shared}/guess.qcow2", good, "without a recorded backing format", "Specification"
    )
    refused(f"cow://{shared}/orphan.qcow2", good, "gone.raw", "Specification")
    assert sorted(p.name for p in scratch.iterdir()) == ["adir", "escape"]
    assert list(outside.iterdir()) == []


def transfer_as(uid: int, url: str, dest: str, scratch: str) -> dict:
    """plugin.transfer_one in a forked child running as ``uid`` (qemu-img included):
    the venv's interpreter lives under /root here, out of an unprivileged user's reach,
    so the job user's plugin cannot be exec'd; the fork needs no exec."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only _exit
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            result = plugin.transfer_one(url, dest, scratch)
            os.write(write_end, json.dumps(result).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(answer)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="switching to an unprivileged user needs root")
def test_overlay_of_an_unreadable_image_is_refused_for_the_job_user():
    # tmp_path lies under a root-only directory: the job user's world is made in /tmp
    top = Path(tempfile.mkdtemp(prefix="jobcage-test-cow-"))
    try:
        top.chmod(0o755)
        shared, scratch = top / "shared", top / "scratch"
        shared.mkdir(mode=0o755)
        scratch.mkdir(mode=0o755)
        os.chown(scratch, 65534, 65534)
        secret = make_base(shared / "secret.raw", "raw")
        secret.chmod(0o600)
        overlay = make_overlay(shared / "base.qcow2", secret, "raw")
        overlay.chmod(0o644)
        dest = f"{scratch}/disk.qcow2"
        result = transfer_as(65534, f"cow://{overlay}", dest, str(scratch))
        assert result["TransferSuccess"] is False
        error = result["TransferError"]
        assert "overlay of" in error and "not readable by uid 65534" in error, error
        assert list(scratch.iterdir()) == []
        secret.chmod(0o644)  # the same user, the same request, once it can read the chain
        assert transfer_as(65534, f"cow://{overlay}", dest, str(scratch))["TransferSuccess"]
        assert os.stat(dest).st_uid == 65534
        check_instance(Path(dest), overlay, "qcow2")
    finally:
        shutil.rmtree(top)


def test_capability_ad_through_the_installed_entry_point():
    done = subprocess.run([PLUGIN, "-classad"], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[0].split(" = ")[0] in plugin.capabilities()  # old format
    ad = classads.parse_ad(done.stdout)
    assert classads.evaluate(ad, "PluginType") == "FileTransfer"
    assert classads.evaluate(ad, "MultipleFileSupport") is True
    assert set(classads.evaluate(ad, "SupportedMethods").split(",")) == {"cow", "nfs"}
    assert classads.evaluate(ad, "PluginVersion") == plugin.PLUGIN_VERSION
    assert classads.evaluate(ad, "ProtocolVersion") == 2


def write_list(path: Path, entries: list[tuple[str, str]]) -> None:
    ads = [classads.new_ad({"Url": url, "LocalFileName": dest}) for url, dest in entries]
    path.write_text(classads.print_ads(ads))


def test_transfer_list_reports_each_file_and_fails_for_one_bad(world, tmp_path):
    shared, scratch = world
    raw = make_base(shared / "a.raw", "raw")
    qc = make_base(shared / "b.qcow2", "qcow2")
    infile, outfile = tmp_path / "in.ads", tmp_path / "out.ads"
    entries = [
        (f"cow://{raw}", f"{scratch}/a.qcow2"),
        (f"cow://{shared}/missing.raw", f"{scratch}/m.qcow2"),
        (f"nfs:{qc}:b-instance.qcow2", f"{scratch}/b.qcow2:b-instance.qcow2"),
    ]
    write_list(infile, entries)
    env = {**os.environ, "_CONDOR_SCRATCH_DIR": str(scratch)}
    argv = [PLUGIN, "-outfile", str(outfile), "-infile", str(infile)]  # either order
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    results = classads.read_ads(str(outfile))
    assert [classads.evaluate(r, "TransferUrl") for r in results] == [e[0] for e in entries]
    assert [classads.evaluate(r, "TransferSuccess") for r in results] == [True, False, True]
    assert "No such file" in classads.evaluate(results[1], "TransferError")
    assert classads.evaluate(results[2], "TransferFileName") == f"{scratch}/b-instance.qcow2"
    for r in (results[0], results[2]):
        name = classads.evaluate(r, "TransferFileName")
        assert classads.evaluate(r, "TransferTotalBytes") == os.stat(name).st_size
        assert classads.evaluate(r, "TransferStartTime") <= classads.evaluate(r, "TransferEndTime")
    check_instance(scratch / "a.qcow2", raw, "raw")
    check_instance(scratch / "b-instance.qcow2", qc, "qcow2")
    assert not (scratch / "m.qcow2").exists()


def test_transfer_list_all_good_exits_zero(world, tmp_path):
    shared, scratch = world
    base = make_base(shared / "a.raw", "raw")
    infile, outfile = tmp_path / "in.ads", tmp_path / "out.ads"
    write_list(infile, [(f"cow://{base}", f"{scratch}/{n}.qcow2") for n in ("x", "y")])
    outfile.write_bytes(b"x" * 65536)  # HTCondor pre-allocates OUT: it must not shrink
    assert plugin.main(["-infile", str(infile), "-outfile", str(outfile)]) == 0
    assert outfile.stat().st_size == 65536
    results = classads.read_ads(str(outfile))  # what was past our ads is blank now
    assert [classads.evaluate(r, "TransferSuccess") for r in results] == [True, True]
    assert all(classads.evaluate(r, "TransferErrorData") is None for r in results)


def test_malformed_transfer_list_writes_one_error_ad(world, tmp_path):
    infile, outfile = tmp_path / "in.ads", tmp_path / "out.ads"
    infile.write_text('[ Url = "cow:///a"; LocalFileName = "/s/a" ] [ Url = ')
    assert plugin.main(["-infile", str(infile), "-outfile", str(outfile)]) == 1
    (result,) = classads.read_ads(str(outfile))
    assert classads.evaluate(result, "TransferSuccess") is False
    assert "unterminated ClassAd" in classads.evaluate(result, "TransferError")
    infile.write_text('[ Url = "cow:///a" ]')
    assert plugin.main(["-infile", str(infile), "-outfile", str(outfile)]) == 1
    assert "LocalFileName" in classads.evaluate(
        classads.read_ads(str(outfile))[0], "TransferError"
    )


def test_upload_is_refused_per_file(world, tmp_path):
    _, scratch = world
    infile, outfile = tmp_path / "in.ads", tmp_path / "out.ads"
    write_list(infile, [("cow:///x", f"{scratch}/x")])
    assert plugin.main(["-infile", str(infile), "-outfile", str(outfile), "-upload"]) == 1
    (result,) = classads.read_ads(str(outfile))
    assert "downloads" in classads.evaluate(result, "TransferError")


@pytest.mark.parametrize("argv", [[], ["-infile", "a"], ["-classad", "x"], ["-x", "a", "-y", "b"]])
def test_bad_arguments_print_usage_and_fail(argv, capsys):
    assert plugin.main(argv) == 1
    assert "usage:" in capsys.readouterr().err


def test_without_the_classad_library_one_line_says_which_extra(monkeypatch, capsys):
    for name in classads.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, None)
    classads.module.cache_clear()
    try:
        assert plugin.main(["-classad"]) == 1
    finally:
        classads.module.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install jobcage[condor]" in err
