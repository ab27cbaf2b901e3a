"""The errors a user can cause and fix: the CLI prints each as one line, with no traceback."""


class LoralabError(Exception):
    """A problem with the user's input (config value, path, file), worded as problem plus fix."""


class ConfigError(LoralabError):
    pass


class DataError(LoralabError):
    pass


class ArtifactError(LoralabError):
    """A weights, adapter or run-directory file that is missing, foreign or damaged."""


class DivergedError(LoralabError):
    """Training produced a NaN or infinite loss: the settings (often the learning rate) need changing."""
