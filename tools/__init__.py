"""Built-in tools and sandboxes."""
