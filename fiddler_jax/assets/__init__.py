"""Files shipped inside the package (the bundled tiny Mixtral lands in ``tiny-mixtral/``)."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_MIXTRAL = ASSETS_DIR / "tiny-mixtral"


def default_model_path() -> Path | None:
    """The bundled default model folder, or None when this checkout does not ship it yet."""
    return TINY_MIXTRAL if (TINY_MIXTRAL / "config.json").is_file() else None
