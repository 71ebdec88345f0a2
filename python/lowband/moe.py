"""Mixture-of-Experts routing, load balancing and layers (lowband.moe)."""
__all__ = []
