"""Work done away from the node: retrieval over WADO-RS and remote workers fed through a broker."""
