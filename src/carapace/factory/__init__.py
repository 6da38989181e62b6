"""VM templates (Kata's VM factory): a pod VM saved once it booted to "agent ready",
restored by pods instead of a boot of their own. ``template`` is the template itself
(what it is made of, its key, its store, how it is built); the sandbox restores it."""

from carapace.factory.template import (
    MAX_TEMPLATES,
    Template,
    TemplateStore,
    build_template,
    clone_spec,
    copy_sparse,
    template_key,
    template_spec,
)

__all__ = [
    "MAX_TEMPLATES",
    "Template",
    "TemplateStore",
    "build_template",
    "clone_spec",
    "copy_sparse",
    "template_key",
    "template_spec",
]
