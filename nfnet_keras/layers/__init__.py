"""Layers every network of the package is built from."""
