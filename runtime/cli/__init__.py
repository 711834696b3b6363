"""The runtime's command-line tools: persense-infer, persense-eval, persense-synth."""
