"""Conformance of the agent's TUF client to the tuf-conformance client protocol."""
