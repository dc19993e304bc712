"""Stand-in for pycolmap on the device machine (see README.md here): importable, unusable."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"pycolmap.{name}: pycolmap is not installed on this machine")
