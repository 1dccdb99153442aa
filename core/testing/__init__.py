"""Conformance helpers for compressor plugins (see docs/plugins/testing.md)."""
