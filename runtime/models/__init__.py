"""The exported models as the runtime calls them: SAM, the Grounding DINO detector, its text prompt."""
