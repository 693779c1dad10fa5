"""Entry point for ``kopf run -m k8s.operator.main``: the handlers on kopf's
default registry, configured from the environment (read here, once)."""

from __future__ import annotations

import kopf

from k8s.operator.config import OperatorConfig
from k8s.operator.handlers import register

register(kopf.get_default_registry(), OperatorConfig.from_env())
