"""The HTTP surface of imagegate: validation, routing, output normalization, metrics, CLI."""
