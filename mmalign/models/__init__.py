"""Generator adapters (SD 1.x/2.x, SDXL, SD3, Flux, text-to-video) and VLM loading."""
