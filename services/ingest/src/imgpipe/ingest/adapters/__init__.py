"""Adapters to the outside world: the Mongo repository and the event publisher."""
