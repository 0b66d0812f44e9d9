"""Offline dataset preparation: image sources -> WebDataset shards + manifest -> object storage."""
