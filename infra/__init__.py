"""What every package may use: user-facing errors, S3 access and the object-storage lease."""
