"""Domain layer: the service facade (`PoolService`), its records and validation."""
