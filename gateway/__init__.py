"""decompute's hub: wire protocol and identities (shared by all sides), server, ledger."""
