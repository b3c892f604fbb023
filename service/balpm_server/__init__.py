"""balpm server: a gRPC service that decides which preference pairs to label next."""

__version__ = "0.1.0"
