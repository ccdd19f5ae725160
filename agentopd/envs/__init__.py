"""Built-in environments: lookup-chain, sql, code-sandbox."""
