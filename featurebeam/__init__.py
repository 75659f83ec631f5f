"""featurebeam core: version, errors, configuration and audio conditioning shared by all packages."""

__version__ = "0.1.0"
