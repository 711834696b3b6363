"""Density counters: the PerSense counters (CounTR, DSALVANet, SAM prototypes) and a density file."""
