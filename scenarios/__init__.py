"""Bundled scenario files (YAML). Load them with mooncake_protocol.scenario.load_scenario(name)."""
