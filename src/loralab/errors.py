"""The errors a user can cause and fix: the CLI prints each as one line, with no traceback."""

import argparse
import sys


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


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: a usage error ends as every loralab error does, in one line and exit 2,
    not argparse's usage block above it."""

    def error(self, message: str):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)
