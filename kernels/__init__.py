"""Triton kernels with pure-torch references (see issue: kernels)."""
