"""Image geometry: SAM's frame, Pillow- and torch-exact resampling, mask upsampling."""
