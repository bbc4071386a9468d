"""Server-side TEE providers: where evidence (and sealing keys) come from, one module per kind."""
