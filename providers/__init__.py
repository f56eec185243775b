"""Upstream adapters: one module per upstream kind, all behind `providers.base.Provider`."""
