"""The CLI's subcommands: one module each (`register(subparsers)` + `run(args)`), thin over the library."""


def quiet_library_noise(args) -> None:
    """Hide known, harmless library noise unless -v (bitsandbytes' optional-kernel notice, deprecations)."""
    import logging
    import warnings

    if not getattr(args, "verbose", False):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
