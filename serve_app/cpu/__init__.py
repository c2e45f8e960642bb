"""What the CPU replicas run besides image I/O: the tile plan and stitching, the face canvas
and paste-back. numpy and OpenCV only: these modules import neither torch nor facexlib."""
