"""Baselines run through the same data pipeline as the plugin."""
