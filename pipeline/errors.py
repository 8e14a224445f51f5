"""Error types the CLI maps to exit codes: UserError -> 2 (message, no traceback)."""


class UserError(Exception):
    """Bad config, bad input or a missing file: the user can fix it. Exit code 2."""


class MissingDependencyError(UserError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed. "
            f"Install it with: pip install -e '.[{extra}]' (or run `make setup`)."
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # only a missing package, not a broken one, is a user error
        if getattr(exc, "name", None) and exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingDependencyError(module, extra, purpose) from exc
