"""Bridges between balpm and labelling tools (Label Studio). Standard library + the balpm SDK only."""
