"""visurf_ray: ViSurf (Visual Supervised-and-Reinforcement Fine-Tuning) experiment suite on Ray."""

from visurf_ray.numerics import pin_cpu_numerics

pin_cpu_numerics()
