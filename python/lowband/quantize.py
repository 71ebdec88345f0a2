"""Quantization and bit packing (filled in by the quantization issue)."""
__all__ = []
