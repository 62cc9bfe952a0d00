"""Feature-collapse analysis of pretrained ConvNeXt encoders: `python -m analysis COMMAND`."""


class AnalysisError(ValueError):
    """Raised for invalid analysis input; the CLI logs its message and exits with status 2."""
