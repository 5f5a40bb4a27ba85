"""Repeatable benchmarks for Director: ``python -m bench`` (``make bench``) prints a table.

Never part of the pass/fail suite. Each module owns one job: ``procfs`` reads the kernel's view
of a process, ``reaper`` guarantees that nothing we start outlives us, ``probe`` asks
``/api/health``, ``servers``, ``daemon`` and ``database`` start what is measured,
``loadgen``, ``wrk`` and ``baseline_server`` generate and absorb load, ``startup``, ``memory``
and ``throughput`` produce the figures, and ``report`` prints and saves them.
"""
