"""``jobcage-transfer-plugin``: HTCondor's file-transfer plugin protocol (HTCondor 9+).

HTCondor's starter runs the plugin three ways:

* ``-classad``: print the capability ad (which URL methods, ``MultipleFileSupport``)
  and exit 0. HTCondor calls this once at start-up for every FILETRANSFER_PLUGINS entry.
* ``-infile IN -outfile OUT [-upload]``: IN holds one new-format ad per file (``Url``,
  ``LocalFileName``); the plugin writes one result ad per file to OUT, in the same
  order, and exits 0 when every file succeeded, 1 otherwise. Every file is tried, so
  the job's hold reason can name each bad one, not only the first. A failure carries
  ``TransferError`` (for people) and ``TransferErrorData`` (for HTCondor's retry
  decisions: Parameter, Specification, or Transfer with NoSpace). OUT is written
  without truncation: HTCondor pre-allocates it.
* ``URL DEST`` (the pre-9 single-file form): exit 0 or 1, the error on stderr.

The protocol is HTCondor's "File Transfer Plug-Ins" API, version 2 (the query ad in the
old, line-oriented format; the transfer ads in the new one).

The scratch directory every instance must land in is ``$_CONDOR_SCRATCH_DIR`` when
HTCondor set it, else the working directory the starter ran the plugin in.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .. import classads
from ..errors import ClassAdError, JobCageError, TransferError
from . import qcow, urls

Value = bool | int | float | str
Result = dict[str, Value | list[dict[str, Value]]]

PLUGIN_VERSION = "1.0.0"
PROTOCOL_VERSION = 2  # HTCondor's multi-file protocol; 4 would make TransferErrorData a must
EXIT_SUCCESS = 0
EXIT_FAILURE = 1  # 2 would ask HTCondor to refresh credentials: never meant here

UPLOAD_REFUSAL = (
    "jobcage-transfer-plugin only makes instances for jobs (downloads): "
    "do not route output transfers to cow:// or nfs: URLs"
)
USAGE = """usage: jobcage-transfer-plugin -classad
       jobcage-transfer-plugin -infile IN -outfile OUT [-upload]
       jobcage-transfer-plugin URL DEST
URLs: cow:///<base image> or nfs:<base image>:<instance file name>
"""


def capabilities() -> dict[str, bool | int | str]:
    return {
        "MultipleFileSupport": True,
        "PluginType": "FileTransfer",
        "PluginVersion": PLUGIN_VERSION,
        "ProtocolVersion": PROTOCOL_VERSION,
        "SupportedMethods": ",".join(urls.METHODS),
    }


def scratch_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("_CONDOR_SCRATCH_DIR") or os.getcwd()


def transfer_one(url: str, dest: str, scratch: str) -> Result:
    """The result ad's attributes for one file; never raises for a bad request."""
    start = time.time()
    result: Result = {
        "TransferUrl": url,
        "TransferFileName": dest,
        "TransferProtocol": url.partition(":")[0].lower(),
        "TransferType": "download",
        "TransferStartTime": int(start),
    }
    try:
        request = urls.parse(url, dest)
        instance = qcow.create_instance(request.base, request.dest, scratch)
    except TransferError as e:
        result.update(_failure(_one_line(e), e.kind, e.no_space, 1))
    except OSError as e:  # the destination directory's own errors (ENOSPC, EROFS, ...)
        no_space = e.errno == errno.ENOSPC
        kind = "Transfer" if no_space else "Parameter"
        result.update(_failure(f"{dest}: {_one_line(e)}", kind, no_space, e.errno or 1))
    else:
        result.update(
            TransferSuccess=True,
            TransferFileName=instance.path,
            TransferFileBytes=instance.size_bytes,
            TransferTotalBytes=instance.size_bytes,
        )
    end = time.time()
    result.update(TransferEndTime=int(end), ConnectionTimeSeconds=end - start)
    return result


def _failure(message: str, kind: str, no_space: bool, code: int) -> Result:
    """TransferError and its structured twin, TransferErrorData (one ad: one attempt)."""
    data: dict[str, Value] = {"ErrorType": kind, "ErrorCode": code, "ErrorString": message}
    if kind == "Parameter":
        data.update(PluginVersion=PLUGIN_VERSION, PluginLaunched=True)
    else:  # the base's storage, or the scratch directory: both this node's file systems
        data["FailedServer"] = socket.gethostname()
    if kind == "Transfer":
        data["FailureType"] = "NoSpace" if no_space else "TimedOut"
    return {"TransferSuccess": False, "TransferError": message, "TransferErrorData": [data]}


def run_list(infile: str, outfile: str, upload: bool, scratch: str) -> int:
    """The multi-file form; the exit status HTCondor expects."""
    try:
        ads = classads.read_ads(infile)
        requests = [
            (_string(ad, "Url", n), _string(ad, "LocalFileName", n)) for n, ad in enumerate(ads, 1)
        ]
    except (ClassAdError, TransferError) as e:
        _write_results(outfile, [_failure(f"transfer list {infile}: {e}", "Parameter", False, 1)])
        return EXIT_FAILURE
    results: list[Result] = []
    for url, dest in requests:
        if upload:
            refusal = _failure(UPLOAD_REFUSAL, "Parameter", False, 1)
            results.append({"TransferUrl": url, "TransferFileName": dest, **refusal})
        else:
            results.append(transfer_one(url, dest, scratch))
    if not _write_results(outfile, results):
        return EXIT_FAILURE
    return EXIT_SUCCESS if all(r["TransferSuccess"] for r in results) else EXIT_FAILURE


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv), stdout)
    except JobCageError as e:  # the ClassAd library is missing: no ad can be written
        print(f"jobcage-transfer-plugin: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


def _main(args: list[str], stdout: TextIO | None) -> int:
    out = stdout or sys.stdout
    if args == ["-classad"]:
        # old format, as HTCondor's own plugins print it: the starter reads it as such
        out.write(classads.print_ad(classads.new_ad(capabilities()), old=True))
        return EXIT_SUCCESS
    upload = "-upload" in args
    flags = [a for a in args if a != "-upload"]
    if len(flags) == 4 and sorted(flags[0::2]) == ["-infile", "-outfile"]:
        files = dict(zip(flags[0::2], flags[1::2], strict=True))
        return run_list(files["-infile"], files["-outfile"], upload, scratch_dir())
    if len(args) == 2 and not args[0].startswith("-"):
        result = transfer_one(args[0], args[1], scratch_dir())
        if not result["TransferSuccess"]:
            print(f"jobcage-transfer-plugin: {result['TransferError']}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_SUCCESS
    sys.stderr.write(USAGE)
    return EXIT_FAILURE


def _string(ad: classads.ClassAd, name: str, number: int) -> str:
    value = classads.evaluate(ad, name)
    if not isinstance(value, str):
        raise TransferError(f"ad number {number} has no string attribute {name}")
    return value


def _write_results(outfile: str, results: list[Result]) -> bool:
    """Into OUT without truncating it: HTCondor pre-allocates the file so that a plugin
    on a full disk can still say so. What is left past our ads is blanked with spaces,
    which the ClassAd parser skips (and which reuse the blocks already allocated)."""
    data = classads.print_ads(classads.new_ad(r) for r in results).encode()
    try:
        fd = os.open(outfile, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            tail = os.fstat(f.fileno()).st_size - len(data)
            if tail > 0:
                f.write(b" " * tail)
    except OSError as e:
        print(f"jobcage-transfer-plugin: cannot write {outfile}: {e.strerror}", file=sys.stderr)
        return False
    return True


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
