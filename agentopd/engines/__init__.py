"""agentopd/engines."""
