"""PerSense's stages in NumPy: location prior, exemplar cascade, IDM, PPSM, masks, the result."""
