"""SAM in PyTorch: segment-anything's modules, their build and load, and the graphs persense exports."""
