"""The HTTP side: edge policy (headers, CORS, Host/Origin, trace ids, size limits) and routes."""
