"""Bundled topology files (YAML). Load them with mooncake_protocol.topology.load_topology(name)."""
