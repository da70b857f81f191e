"""Bit-width searches. Policies are searches that need no data; learned searches come later."""

from qcompile.search.policies import Assignment, LayerBits, policy_assignment

__all__ = ["Assignment", "LayerBits", "policy_assignment"]
