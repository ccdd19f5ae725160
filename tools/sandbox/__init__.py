"""tools/sandbox."""
