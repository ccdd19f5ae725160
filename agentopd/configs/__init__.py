"""Config groups composed by agentopd.config."""
