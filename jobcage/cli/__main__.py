"""``python -m jobcage.cli``: the ``jobcage`` command without its installed script."""

import signal
import sys

from . import main

signal.signal(signal.SIGPIPE, signal.SIG_DFL)
sys.exit(main())
