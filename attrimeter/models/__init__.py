"""Target ReID models: a timm-style registry of backbones with a GeM + BN-neck head."""
