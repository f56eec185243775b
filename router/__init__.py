"""The gateway: HTTP surfaces over one request pipeline, over routing and state (docs/architecture.md)."""
