"""Packaged training recipes (TOML), read with mtl_edge.train.config.load_config."""
