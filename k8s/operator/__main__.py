"""``python -m k8s.operator``: see ``main``."""

from k8s.operator.main import main

main()
