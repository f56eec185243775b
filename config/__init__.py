"""YAML configurations shipped with imagegate: default.yaml (the embedded default), example.yaml
(every option, commented) and examples/ (ready configurations with the seeds' model ids)."""
