"""Long-document multimodal datasets: records, rendering, the on-disk store, building."""
