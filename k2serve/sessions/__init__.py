"""Agent sessions: the Redis session store and session-aware routing state."""
