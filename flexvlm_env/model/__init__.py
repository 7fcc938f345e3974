"""Native PyTorch runtime of the MolmoE topology: preprocessing, vision tower, MoE decoder, generation."""
