"""Stand-in for moviepy.editor on the device machine (see ../README.md): importable,
unusable."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"moviepy.editor.{name}: moviepy is not installed on this machine")
