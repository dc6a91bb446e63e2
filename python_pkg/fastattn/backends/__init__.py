"""Attention backends. Each module holds one `Backend` subclass; see base.py."""
