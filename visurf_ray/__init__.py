"""visurf_ray: ViSurf (Visual Supervised-and-Reinforcement Fine-Tuning) experiment suite on Ray."""
