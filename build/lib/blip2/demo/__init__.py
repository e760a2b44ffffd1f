"""The demo: the shapes world (``shapes``: synthetic scenes with captions and questions, a world where learning is
visible on a 2-core CPU), its recipes (``recipes/*.yaml``, package data) and ``make demo`` itself (``run``)."""
