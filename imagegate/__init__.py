"""imagegate: one image gateway in front of many backends.

The subpackages are the repository's top-level folders (docs/architecture.md): `router` (the HTTP
gateway), `providers` (one adapter per upstream kind), `local_backend` (diffusers on this
machine's GPUs) and `config` (the shipped YAML).
"""

__version__ = "0.1.0"
