"""Shipped presets (YAML); read with importlib.resources."""
