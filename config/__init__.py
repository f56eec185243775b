"""YAML configurations shipped with imagegate: default.yaml (the embedded default) and example.yaml."""
