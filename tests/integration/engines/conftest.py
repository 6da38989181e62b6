"""Fixtures for the tests against real engines: a private dockerd (docker_rig.py) and
podman (podman_rig.py), both with the busybox test image of images.py."""

from __future__ import annotations

from pathlib import Path

from .docker_rig import docker, docker_runtime, dockerd  # noqa: F401

if (Path(__file__).parent / "podman_rig.py").exists():
    from .podman_rig import *  # noqa: F403
