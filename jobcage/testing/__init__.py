"""Test support shipped with the package, like ``numpy.testing``: the simulated world
(:mod:`jobcage.testing.networld`: node, router, campus and internet namespaces) that the
suite, ``tools/demo.py`` and ``tools/benchmarks`` run JobCage in, and the small server
and client scripts (``netserver.py``, ``netclient.py``) run inside its namespaces.

Nothing in ``jobcage`` imports it: only tests and tools do, so a node running jobs never
loads it.
"""
