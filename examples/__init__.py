"""Example apps for wsgate. ``wsgate.examples.app:app`` is what ``wsgate dev`` serves by default."""
