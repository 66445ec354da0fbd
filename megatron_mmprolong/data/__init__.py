"""Long-document multimodal datasets for either family: records, rendering, the image processor
of each family, the on-disk store (checked as it is read), building, plans and the loader."""
