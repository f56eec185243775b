"""The HTTP surfaces: thin adapters that parse a dialect, call the pipeline, and render its answer
in that dialect; plus the HTTP plumbing they share (auth, middleware, bodies, responses)."""
