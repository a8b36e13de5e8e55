"""Fused Triton kernels with their pure-torch references (DESIGN §4).

Sub-modules import torch and triton; this package file imports nothing heavy.
"""
