"""Pieces shared by the datagen, model and train packages (kept tiny: no heavy imports)."""
