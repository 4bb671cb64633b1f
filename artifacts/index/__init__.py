"""The SQL index: a rebuildable copy of what the blobs say, for fast queries."""
