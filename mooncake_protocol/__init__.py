"""The pure protocol layer of a Mooncake-PG-like collective backend.

Rules of this package (see docs/architecture.md):

* It performs no I/O of its own beyond reading the YAML files a user names (topology, scenario).
* It never imports simpy, zmq, cupy, ``mooncake_sim`` or ``mooncake_real``.
* Protocol activities are generator functions that ``yield`` effects (``mooncake_protocol.effects``) and
  receive their results; the drivers interpret them.
"""

__version__ = "0.1.0"
