"""Small random-weight models for the test suite and the benchmarks' toy modes, kept out of the public registry.

    SPECTRAL_JAX_TEST_MODELS=1 spectral-jax extract img.png --model sd_tiny --weights random --out acts.npz
    from spectral_jax.models import testing; testing.enable()    # the same from Python: this process and its children

`MODELS`: sd_tiny (Stable Diffusion 1.x's layout at toy width — 16 self-attention layers on 4 grids; default size
128), pixart_tiny (4 PixArt blocks), sd3_tiny (3 MM-DiT blocks), flux_tiny (2 + 2 FLUX blocks; the DiTs' default size
256). Their architectures live with their family (`sd/config.py` TINY, `dit/config.py` PIXART_TINY, SD3_TINY,
FLUX_TINY, each family's TEST_MODELS). None has published weights: load them with weights="random" (seeded) or a
folder written by a random-init diffusers model.

The registry (`get_spec`, `load_backbone`, `family`, the command line's --model, `sd.load_sd`, `dit.load_dit`)
resolves these names only while the environment variable SPECTRAL_JAX_TEST_MODELS is "1" — the test suite's
conftest sets it, so every console script a test starts has it too; otherwise a name here is refused with an
`InputError` that names the variable. `registry.names()` never lists them, whatever the variable says. Reading
this module does not import JAX.
"""

from __future__ import annotations

import os

from spectral_jax.models.dit.config import TEST_MODELS as _DIT
from spectral_jax.models.sd.config import TEST_MODELS as _SD
from spectral_jax.models.spec import ModelSpec

ENV = "SPECTRAL_JAX_TEST_MODELS"

MODELS: dict[str, ModelSpec] = {**_SD, **_DIT}


def enabled() -> bool:
    """Whether the registry resolves the test models now (SPECTRAL_JAX_TEST_MODELS is "1")."""
    return os.environ.get(ENV) == "1"


def enable() -> None:
    """Let the registry resolve the test models in this process and the processes it starts (sets the variable)."""
    os.environ[ENV] = "1"


__all__ = ["ENV", "MODELS", "enable", "enabled"]
