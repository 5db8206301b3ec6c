"""Image recipes on diffusers pipelines: subject-driven and controllable, one run template (``run``: a typed
prepared run, then fit and score), their loop and sampling (``training``) and their data (``data``)."""
