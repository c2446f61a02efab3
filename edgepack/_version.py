"""The edgepack version, shared by the builder and the agent."""

__version__ = "0.1.0"
