"""Datasets: persense-synth scenes, their evaluation, and folder runs (local and on Ray)."""
