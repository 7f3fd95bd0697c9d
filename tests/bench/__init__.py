"""Tests of ``wsgate bench``."""
