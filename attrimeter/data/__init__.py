"""Attribute schemas, real-format ReID data loaders and the synthetic pedestrian renderer."""
