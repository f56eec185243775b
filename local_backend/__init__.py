"""The local diffusers GPU backend (pipelines, memory, GPU workers, the `imagegate worker`)."""
