"""shardstep service: coordinator, job spec, command line and cluster submission."""

__version__ = "0.1.0"
