"""Rewrite and lowering rules used by the passes (``canonicalize``, ``lower-integer``); not passes themselves."""
