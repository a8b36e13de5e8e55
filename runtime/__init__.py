"""Torch-free batch runtime (DESIGN §6). Filled in by the runtime issue."""
