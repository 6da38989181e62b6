"""The OCI runtime spec: ``Bundle.load`` reads a bundle's config.json once and checks it
(``bundle``); ``Spec`` is the typed, frozen view past that edge; ``spec`` builds the
default spec of `carapace run`."""

from carapace.oci.bundle import Bundle, Mount, Namespace, Spec

__all__ = ["Bundle", "Mount", "Namespace", "Spec"]
