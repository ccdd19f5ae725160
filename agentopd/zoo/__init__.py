"""agentopd/zoo."""
