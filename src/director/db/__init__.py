"""PostgreSQL: the connection pool and LISTEN hub, schema migrations, the embedded default."""
