"""Helpers for the test suite and demos: tiny random-weight models of every
supported architecture, small enough to convert and serve on a laptop CPU."""
