"""Checkpoint I/O: reading sources, writing byte-bounded shards, the manifest."""
