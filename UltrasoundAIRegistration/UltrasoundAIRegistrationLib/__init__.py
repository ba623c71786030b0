"""UltrasoundAIRegistration's Logic package (importable without qt/ctk).

Names are imported on first use, so that a job worker importing
``UltrasoundAIRegistrationLib.scenarios`` (the cancel scenario's task) does not pay for importing ``slicer``.
"""

__all__ = ["UltrasoundAIRegistrationLogic"]


def __getattr__(name):
    if name == "UltrasoundAIRegistrationLogic":
        from .logic import UltrasoundAIRegistrationLogic

        return UltrasoundAIRegistrationLogic
    raise AttributeError(f"module 'UltrasoundAIRegistrationLib' has no attribute {name!r}")
