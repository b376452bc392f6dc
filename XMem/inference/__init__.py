"""Frame-by-frame XMem inference with sensory, working and long-term memory."""
