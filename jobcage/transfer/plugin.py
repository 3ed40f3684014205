"""``jobcage-transfer-plugin``: HTCondor's file-transfer plugin protocol (HTCondor 9+).

HTCondor's starter runs the plugin three ways:

* ``-classad``: print the capability ad (which URL methods, ``MultipleFileSupport``)
  and exit 0. HTCondor calls this once at start-up for every FILETRANSFER_PLUGINS entry.
* ``-infile IN -outfile OUT [-upload]``: IN holds one ad per file (``Url``,
  ``LocalFileName``); the plugin writes one result ad per file to OUT, in the same
  order, and exits 0 when every file succeeded, 1 otherwise. Every file is tried, so
  the job's hold reason can name each bad one, not only the first.
* ``URL DEST`` (the pre-9 single-file form): exit 0 or 1, the error on stderr.

The scratch directory every instance must land in is ``$_CONDOR_SCRATCH_DIR`` when
HTCondor set it, else the working directory the starter ran the plugin in.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .. import classads
from ..errors import ClassAdError, JobCageError, TransferError
from . import qcow, urls

PLUGIN_VERSION = "1.0.0"
EXIT_SUCCESS = 0
EXIT_FAILURE = 1  # 2 would ask HTCondor to refresh credentials: never meant here

USAGE = """usage: jobcage-transfer-plugin -classad
       jobcage-transfer-plugin -infile IN -outfile OUT [-upload]
       jobcage-transfer-plugin URL DEST
URLs: cow:///<base image> or nfs:<base image>:<instance file name>
"""


def capabilities() -> dict[str, bool | str]:
    return {
        "MultipleFileSupport": True,
        "PluginType": "FileTransfer",
        "PluginVersion": PLUGIN_VERSION,
        "SupportedMethods": ",".join(urls.METHODS),
    }


def scratch_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("_CONDOR_SCRATCH_DIR") or os.getcwd()


def transfer_one(url: str, dest: str, scratch: str) -> dict[str, bool | int | float | str]:
    """The result ad's attributes for one file; never raises for a bad request."""
    start = time.time()
    result: dict[str, bool | int | float | str] = {
        "TransferUrl": url,
        "TransferFileName": dest,
        "TransferProtocol": url.partition(":")[0].lower(),
        "TransferType": "download",
        "TransferStartTime": int(start),
    }
    try:
        request = urls.parse(url, dest)
        instance = qcow.create_instance(request.base, request.dest, scratch)
    except JobCageError as e:
        result.update(TransferSuccess=False, TransferError=_one_line(e))
    except OSError as e:  # the destination directory's own errors (ENOSPC, EROFS, ...)
        result.update(TransferSuccess=False, TransferError=f"{dest}: {_one_line(e)}")
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


def run_list(infile: str, outfile: str, upload: bool, scratch: str) -> int:
    """The multi-file form; the exit status HTCondor expects."""
    try:
        ads = classads.read_ads(infile)
        requests = [
            (_string(ad, "Url", n), _string(ad, "LocalFileName", n)) for n, ad in enumerate(ads, 1)
        ]
    except (ClassAdError, TransferError) as e:
        error = {"TransferSuccess": False, "TransferError": f"transfer list {infile}: {e}"}
        _write_results(outfile, [error])
        return EXIT_FAILURE
    results = []
    for url, dest in requests:
        if upload:
            results.append(
                {
                    "TransferUrl": url,
                    "TransferFileName": dest,
                    "TransferSuccess": False,
                    "TransferError": "jobcage-transfer-plugin only makes instances for jobs "
                    "(downloads): do not route output transfers to cow:// or nfs: URLs",
                }
            )
        else:
            results.append(transfer_one(url, dest, scratch))
    if not _write_results(outfile, results):
        return EXIT_FAILURE
    return EXIT_SUCCESS if all(r["TransferSuccess"] for r in results) else EXIT_FAILURE


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
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


def _write_results(outfile: str, results: list[dict[str, bool | int | float | str]]) -> bool:
    text = classads.print_ads(classads.new_ad(r) for r in results)
    try:
        with open(outfile, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        print(f"jobcage-transfer-plugin: cannot write {outfile}: {e.strerror}", file=sys.stderr)
        return False
    return True


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
