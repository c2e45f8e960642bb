"""Videos as jobs: the container's header checked against the limits, then its frames streamed
through the same restoration as pictures (numpy and PyAV; no torch, no Ray)."""
