"""The PyTorch oracle: PerSense as the original runs it, for parity tests and benchmarks."""
