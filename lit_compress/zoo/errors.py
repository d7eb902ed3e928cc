"""Zoo error types: each message says what was found, what was expected and how to fix it."""


class ZooError(Exception):
    """Base class of every zoo error."""


class CardValidationError(ZooError, ValueError):
    """A card is malformed: missing or unknown fields, wrong types, or an edited card."""


class ZooIntegrityError(ZooError):
    """A file's sha256 differs from the one its card records."""


class ZooFormatError(ZooError, ValueError):
    """A checkpoint file is not in the format its card names (or is a refused format such as pickle)."""


class ModelNotFoundError(ZooError, KeyError):
    """No zoo entry of that name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
