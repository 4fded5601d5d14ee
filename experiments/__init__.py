"""The suite's commands: `python experiments/<name>.py` from a checkout, or the console scripts the package installs
(visurf-sweep, visurf-train, visurf-pretrain-base, visurf-perception, visurf-gradients)."""
