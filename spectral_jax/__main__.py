import sys

from spectral_jax.cli import main

sys.exit(main())
