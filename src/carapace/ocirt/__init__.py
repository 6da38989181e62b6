"""carapace as an OCI runtime with runc's command line, for Docker and Podman.

``cli`` parses runc's command line; ``lifecycle`` and ``verbs`` do the verbs as
clients of the pod's sandbox service (``service``: the containerd shim's task service
on a socket under ``--root``), which owns the VM; ``holder`` is the host process that
stands for each container process (the pid file's); ``bundlespec`` turns the engine's
bundle into the service's (pure); ``layout`` is the state under ``--root``.
"""
