"""SimPy driver: runs the pure protocol (:mod:`mooncake_protocol`) against a model of the hardware.

It interprets the protocol's effects on models of the store server, per-host port tables, RPC, links and
fabrics (built from a :class:`mooncake_protocol.topology.Topology`), GPU streams and the module loader,
detects hangs, and ships the ``mooncake-sim`` CLI (:mod:`mooncake_sim.cli`). Importing this package
imports nothing heavy: simpy is imported by the modules that need it.
"""
