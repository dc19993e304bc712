"""Stand-in for moviepy on the device machine (see ../README.md): importable, unusable."""
