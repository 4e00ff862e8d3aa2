"""Maintainer scripts; a package so tests can reuse the demo model's shape drawing and classifier."""
