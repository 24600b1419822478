"""AMAT quantization: MSB/LSB slices of expert weights (SliceMoE)."""
