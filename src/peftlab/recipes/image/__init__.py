"""Image recipes on diffusers pipelines: subject-driven and controllable, with their training loop
(``training``) and their data (``data``)."""
