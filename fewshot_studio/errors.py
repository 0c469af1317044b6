"""Errors a user can cause. Each one's str() is one clear sentence saying what failed and how to fix it."""


class FewShotError(Exception):
    """Base of every error a user can cause; str() is one clear sentence."""


class WeightsUnavailableError(FewShotError):
    """Backbone weights could not be obtained (no network, bad path, unknown name)."""


class BackboneError(FewShotError):
    """The backbone cannot do what was asked (e.g. MMA on a ResNet tower)."""


class ModelFileError(FewShotError):
    """A saved model directory is missing, malformed or does not match its backbone."""


class DataError(FewShotError):
    """The training or prediction data is unusable (no classes, empty class, ...)."""


class Cancelled(FewShotError):
    """Raised inside a fit loop when the user cancels; the previous state is kept."""

    def __init__(self, message: str = "Training was cancelled; the project is unchanged."):
        super().__init__(message)
