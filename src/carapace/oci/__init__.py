"""The OCI runtime spec: ``Bundle.load`` reads a bundle's config.json once and checks it
(``bundle``); ``Spec`` is the typed, frozen view past that edge; ``spec`` builds the
default spec of `carapace run`; ``files`` reads a bundle's files (standard library
only). The names below load ``bundle`` at their first use, so that importing ``files``
alone stays light (the shim binary's start and delete)."""

from __future__ import annotations

TYPE_CHECKING = False  # the type checker reads it as True; typing itself is not imported
if TYPE_CHECKING:
    from carapace.oci.bundle import Bundle, Mount, Namespace, Spec

__all__ = ["Bundle", "Mount", "Namespace", "Spec"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from carapace.oci import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'carapace.oci' has no attribute {name!r}")
