"""Doors: other ways in (HTTP, editors), each a protocol v1 client of the daemon."""
