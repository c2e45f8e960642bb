"""Ray Serve deployments: thin adapters that own resources; the work is in serve_app.engines."""
