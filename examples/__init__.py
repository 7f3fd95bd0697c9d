"""Example apps for wsgate. ``examples.app:app`` is what ``wsgate dev`` serves by default."""
