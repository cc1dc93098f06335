"""zpipe: stream detector data from receiving servers into compute-node memory over ZeroMQ."""

__version__ = "0.1.0"
