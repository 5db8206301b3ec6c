"""Image generation with diffusers: adapters on pipelines, the embedded offline model, image metrics."""
