"""Dense inference over volumes far larger than memory: inputs, block grid, memory plan, manifest, outputs."""
