"""Deployable applications built on gnaq_stream."""
