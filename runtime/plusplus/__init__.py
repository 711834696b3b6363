"""PerSense++'s own stages in NumPy: hybrid IDM (contours + peaks), diversity-aware exemplars, IMRM."""
