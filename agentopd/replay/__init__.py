"""agentopd/replay."""
