"""Error-feedback state objects (filled in by the error-feedback issue)."""
__all__ = []
