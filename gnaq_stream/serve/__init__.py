"""Serving: top-K from packed rows."""
