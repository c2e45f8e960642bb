"""Who may call the HTTP API and how fast: API keys with scopes, and per-key rate limits. Runs in
the ingress; the ``restore-serve-keys`` command makes keys."""
