"""A step cache shared through an OCI registry (see the README's "Sharing a cache between hosts").

``layout`` turns a result and its closure into registry objects and back
(pure), ``trust`` signs and checks them, ``push`` and ``pull`` move them,
``lazy`` brings a remote hit's closure when something needs it, and
``service`` is what the daemon asks (lookups, pulls, the push queue).
"""
