"""The zipmoe runtime: MoE models served from a container through a compression-aware expert cache."""
