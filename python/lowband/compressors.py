"""Compressor objects for composition (filled in by the quantization issue)."""
__all__ = []
