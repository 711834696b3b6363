"""persense-train-tiny: training the tiny SAM on persense-synth scenes."""
