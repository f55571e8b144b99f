"""The experiment schema, the ground floor: one YAML file -> typed, validated config objects.

Both sides read the YAML through :func:`load_config`: the torchx component (to
plan the roles) and every trainer process (to train), so the launch plan and the
training can never disagree.
"""

from localsgd_ft.config.schema import *  # noqa: F401,F403
from localsgd_ft.config.schema import _type_name  # noqa: F401
