"""`python -m sedflow_jax.cli ...`: the same as the `sedflow-jax` command."""
import sys

from .main import main

sys.exit(main())
