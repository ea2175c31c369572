"""HTTP: STOW-RS and the REST API."""
