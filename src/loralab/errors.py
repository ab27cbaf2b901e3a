"""The errors a user can cause and fix: the CLI prints each as one line, with no traceback."""


class LoralabError(Exception):
    """A problem with the user's input (config value, path, file), worded as problem plus fix."""


class ConfigError(LoralabError, ValueError):
    """A setting's value outside its rules; a ValueError too, as Python callers of the settings'
    classes (``LoRASpec(rank=0)``) expect."""


class DataError(LoralabError):
    pass


class ArtifactError(LoralabError):
    """A weights, adapter or run-directory file that is missing, foreign or damaged."""


class DivergedError(LoralabError):
    """Training produced a NaN or infinite loss: the settings (often the learning rate) need changing."""
