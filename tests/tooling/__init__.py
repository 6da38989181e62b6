"""Tooling for the tests that is no part of carapace (e.g. OCI image archives for the
containerd tests, written by scripts/build-test-images)."""
