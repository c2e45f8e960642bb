"""restore-serve: Real-ESRGAN and GFPGAN image restoration on Ray Serve."""
from serve_app import _compat  # noqa: F401  (must run before basicsr, realesrgan or gfpgan load)

__version__ = "0.1.0"
