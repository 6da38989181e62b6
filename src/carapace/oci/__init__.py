"""OCI runtime-spec: building, loading and checking config.json."""
