"""Adapters for the outside world: downloads, storage, the Mongo repository."""
