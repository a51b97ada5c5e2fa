"""Drivers for real multi-process swarms on 127.0.0.1, shared by the tests and the benchmarks.

Why they live in the package rather than under ``tests/``: the benchmarks (``benchmarks/``)
drive the same processes, and a peer worker must be importable as ``python -m
swarmlm.testing.p2p`` in a child process. Nothing in the library imports this package; it
sits above every layer (p2p, swarm, node) and only starts their command-line entry points.

* :mod:`swarmlm.testing.p2p`: ``Swarm`` / ``NodeProcess``, round-protocol peers driven over
  stdin/stdout (and the worker side, ``python -m swarmlm.testing.p2p``);
* :mod:`swarmlm.testing.swarm`: ``SwarmProcesses``, swarm training peers (``swarmlm swarm``);
* :mod:`swarmlm.testing.node`: ``NodeNetwork`` / ``NodeProcess``, whole nodes (``swarmlm node``);
* :mod:`swarmlm.testing.rlhf_loop`: a node running the RLHF loop and simulated annotators
  that label through its HTTP API.
"""
