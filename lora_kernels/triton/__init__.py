"""Triton launchers. Importing this package imports triton: only the op layer does, lazily."""
