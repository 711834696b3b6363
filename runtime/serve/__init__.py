"""persense-serve: PerSense behind HTTP (FastAPI): a REST API, a web page at `/`, and a Ray Serve deployment."""
