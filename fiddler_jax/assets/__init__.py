"""Files shipped inside the package: the bundled tiny models (``tiny-mixtral/``, the default, and
``tiny-qwen3-moe/``, its fine-grained sibling), each an HF folder trained by ``fiddler-jax train-tiny``."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_MIXTRAL = ASSETS_DIR / "tiny-mixtral"
TINY_QWEN3_MOE = ASSETS_DIR / "tiny-qwen3-moe"
BUNDLED = {"tiny": TINY_MIXTRAL, "tiny_qwen3_moe": TINY_QWEN3_MOE}  # model= preset name -> folder


def bundled_model_path(name: str = "tiny") -> Path | None:
    """The folder of the bundled model a ``model=`` preset names (``tiny``, ``tiny_qwen3_moe``), or None when
    this checkout does not ship it."""
    folder = BUNDLED.get(name)
    return folder if folder is not None and (folder / "config.json").is_file() else None


def default_model_path() -> Path | None:
    """The bundled default model folder (tiny-mixtral), or None when this checkout does not ship it yet."""
    return bundled_model_path("tiny")
