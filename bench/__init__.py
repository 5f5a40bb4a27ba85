"""Repeatable benchmarks for Director: ``python -m bench`` (``make bench``) prints a table.

Never part of the pass/fail suite. Each module owns one job: ``procfs`` reads the kernel's view
of a process, ``reaper`` guarantees that nothing we start outlives us, ``probe`` asks
``/api/health``, ``servers``, ``daemon`` and ``database`` start what is measured, ``api`` sets
the stage through the REST API, ``loadgen``, ``mcpload``, ``streams``, ``wrk``,
``echo_server`` and ``baseline_server`` generate and absorb load (each in its own process),
``reload`` times the playbook cache in a process of its own, ``startup``, ``memory``,
``throughput``, ``accounts``, ``playbooks`` and ``mcp`` produce the figures, and ``report``
prints and saves them.
"""
